//! Sockets: options, upstream connects, splice, the PROXY protocol codec.

pub mod connect;
pub mod proxy_protocol;
pub mod sockopt;
pub mod splice;
