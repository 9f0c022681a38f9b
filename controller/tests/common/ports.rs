//! A free loopback port for a server a test starts (shared by every test support module).

use std::net::TcpListener;

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
