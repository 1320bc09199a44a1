//! Integration tests of the `bsi` binary: each drives the real binary and checks what it wrote
//! (trees on disk, package bytes) with the library crates.

mod channel;
mod code;
mod crash;
mod escape;
mod gzip;
mod keys;
mod letters;
mod openssl;
mod reproducible;
mod roundtrip;
mod scan;
mod support;
mod tamper;
mod usage;
mod wrong_base;
