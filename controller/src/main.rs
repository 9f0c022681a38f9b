//! The `fediversity` command: daemon and CLI.

fn main() {}
