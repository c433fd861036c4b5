//! Sockets: options, listeners, upstream connects.

pub mod connect;
pub mod listen;
pub mod sockopt;
pub mod splice;
