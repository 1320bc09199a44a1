//! Engine integration tests: round trips over random trees.

mod components;
mod confine;
mod faults;
mod fixture;
mod foreign;
mod newcode;
mod renames;
mod revertdata;
mod roundtrip;
