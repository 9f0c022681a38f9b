//! Helpers shared by the end-to-end tests of the Fediversity controller.
