//! Engine integration tests: round trips over random trees.

mod components;
mod fixture;
mod renames;
mod roundtrip;
