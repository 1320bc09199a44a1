//! Engine integration tests: round trips over random trees.

mod fixture;
mod roundtrip;
