//! Engine integration tests: round trips over random trees.

mod components;
mod faults;
mod fixture;
mod renames;
mod roundtrip;
