//! Sockets: options, upstream connects, splice.

pub mod connect;
pub mod sockopt;
pub mod splice;
