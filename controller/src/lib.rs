//! The Fediversity controller: declarative hosting of Fediverse applications.

pub mod yaml;
