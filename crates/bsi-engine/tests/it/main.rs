//! Engine integration tests: round trips over random trees.

mod components;
mod fixture;
mod roundtrip;
