use std::io::{self, Read, Write};

use zstd::stream::raw::{CParameter, DParameter};

use crate::{copy_exact_len, window_log, DecodeError, DeltaEncoder, LEVEL};

/// Largest new file encoded through zstd's multithreaded path in jobs of zstd's default size
/// (64 MiB at level 19 with long distance matching: one job; see [`jobs`]).
const ONE_JOB_MAX: usize = 64 << 20;
/// Smallest old file encoded through zstd's multithreaded path, exclusive (see [`jobs`]).
const MULTITHREADED_MIN_OLD: usize = 8 << 20;
/// The size of zstd's jobs for new files over [`ONE_JOB_MAX`] (see [`jobs`]).
const JOB_SIZE: u32 = 32 << 20;
/// At most this many zstd workers, whatever the number of cores: each job in flight adds about
/// 90 MB at level 19 (libxul.so: peak 925 MB on one thread, 1,040 MB with 2 workers, 1,223 MB
/// with 4), and the build stays within 6 times the largest file + 256 MB with 2 (1,098 MiB on
/// the Firefox pair against 1,307 MiB).
const MAX_WORKERS: u32 = 2;
/// How much of a payload decoding reads at a time from a stream (a package file).
const PAYLOAD_BUFFER: usize = 128 << 10;

/// zstd with the old file as reference prefix (what `zstd --patch-from` does), in long mode with
/// a window that covers old and new file together.
#[derive(Debug, Clone, Copy)]
pub struct ZstdPrefix;

impl DeltaEncoder for ZstdPrefix {
    fn name(&self) -> &'static str {
        "zstd-prefix"
    }

    /// Level 19 with a long window runs at 0.5 to 3 MB/s. Beyond 64 KiB it was smaller than
    /// bsdiff only where every delta was weak (13 Firefox files of 74 KB to 1 MB, 13 major
    /// versions apart); on libssl3's libssl.so (688 KB) it cost 0.26 s for 39,921 B against
    /// bsdiff's 12,296 B. Below, it wins by a few bytes (5 to 25 on the plists and engines of
    /// the testdata and libssl3) in milliseconds.
    fn max_new_len(&self) -> usize {
        64 << 10
    }

    /// On text it wins: libssl3's changelog (1 MB, 3.0.17 -> 3.0.20) costs 3,770 B inside its
    /// gzip payload against 5,140 B with bsdiff.
    fn max_text_len(&self) -> usize {
        1 << 20
    }

    fn covers_plain(&self) -> bool {
        true
    }

    fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let jobs = jobs(old.len(), new.len(), rayon::current_num_threads());
        encode_in(old, new, LEVEL, jobs)
    }

    fn decode_into(
        &self,
        old: &[u8],
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let payload_len = payload.len() as u64;
        self.decode_stream_into(old, &mut { payload }, payload_len, new_len, out)
    }

    /// Streams: Firefox's libxul.so has a 45 MiB payload, read [`PAYLOAD_BUFFER`] at a time.
    fn decode_stream_into(
        &self,
        old: &[u8],
        payload: &mut dyn Read,
        payload_len: u64,
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let window = window_log(old.len() as u64 + new_len);
        let mut raw =
            zstd::stream::raw::Decoder::with_ref_prefix(old).map_err(DecodeError::Corrupt)?;
        raw.set_parameter(DParameter::WindowLogMax(window))
            .map_err(DecodeError::Corrupt)?;
        let input = io::BufReader::with_capacity(PAYLOAD_BUFFER, payload.take(payload_len));
        let decoder = zstd::stream::zio::Reader::new(input, raw);
        copy_exact_len(decoder, new_len, out)
    }
}

/// How zstd's multithreaded path runs: worker threads, and the size of the jobs the new file is
/// cut into (`None`: zstd's default for the level and window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Jobs {
    workers: u32,
    size: Option<u32>,
}

/// How `encode` runs zstd for files of these sizes on `cores` threads: `None` for the
/// single-threaded path (see [`encode_in`]).
fn jobs(old_len: usize, new_len: usize, cores: usize) -> Option<Jobs> {
    if old_len <= MULTITHREADED_MIN_OLD {
        return None;
    }
    Some(match new_len > ONE_JOB_MAX {
        true => Jobs {
            workers: u32::try_from(cores)
                .unwrap_or(u32::MAX)
                .clamp(1, MAX_WORKERS),
            size: Some(JOB_SIZE),
        },
        false => Jobs {
            workers: 1,
            size: None,
        },
    })
}

/// The payload of `new` against `old` at zstd `level`, through zstd's multithreaded path when
/// `jobs` is given.
///
/// That path (as the zstd program uses) lets long distance matching see the prefix, which the
/// single-threaded path does not: Firefox's omni.ja (43 MB, ESR 140 -> 153) costs 1,848,351 B
/// instead of 3,384,901 B. It runs only where it paid: old files over 8 MiB (on the security
/// updates' smaller files it saved 26 bytes in all and cost 25% more build time). New files up
/// to 64 MiB go as one job; larger ones in jobs of 32 MiB on up to 2 cores: libxul.so
/// (184 MB) in 73 s instead of 116 s single-threaded on 2 cores, for 47,529,799 B instead of
/// 47,502,671 B (+0.06%; as one job, 47,470,967 B in 134 s). zstd's output on this path does not
/// depend on the number of workers, so the payload does not depend on the machine.
fn encode_in(
    old: &[u8],
    new: &[u8],
    level: i32,
    jobs: Option<Jobs>,
) -> io::Result<Option<Vec<u8>>> {
    let window = window_log(old.len() as u64 + new.len() as u64);
    let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, old)?;
    encoder.set_parameter(CParameter::WindowLog(window))?;
    encoder.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    if let Some(jobs) = jobs {
        encoder.set_parameter(CParameter::NbWorkers(jobs.workers.max(1)))?;
        if let Some(size) = jobs.size {
            encoder.set_parameter(CParameter::JobSize(size))?;
        }
    }
    encoder.set_parameter(CParameter::ChecksumFlag(false))?;
    encoder.set_pledged_src_size(Some(new.len() as u64))?;
    encoder.write_all(new)?;
    encoder.finish().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::text;

    #[test]
    fn jobs_by_size_and_cores() {
        let mib = 1 << 20;
        let one_job = Some(Jobs {
            workers: 1,
            size: None,
        });
        let split = |workers| {
            Some(Jobs {
                workers,
                size: Some(JOB_SIZE),
            })
        };
        for (old, new, cores, expected) in [
            (8 * mib, 200 * mib, 2, None),
            (8 * mib + 1, 64 * mib, 2, one_job),
            (8 * mib + 1, 64 * mib, 64, one_job),
            (8 * mib + 1, 64 * mib + 1, 1, split(1)),
            (177 * mib, 184 * mib, 2, split(2)),
            (177 * mib, 184 * mib, 64, split(2)),
        ] {
            assert_eq!(jobs(old, new, cores), expected, "{old} {new} on {cores}");
        }
    }

    #[test]
    fn jobs_give_the_same_payload_on_any_number_of_workers() {
        // Text: the old file's, moved, then 2 MiB of new text, which only the jobs' own
        // matching (not long distance matching) compresses.
        let old = text(1, 3 << 20);
        let mut new = old[1 << 20..].to_vec();
        new.extend_from_slice(&old[..1 << 20]);
        new.extend_from_slice(&text(2, 2 << 20));
        let payloads: Vec<Vec<u8>> = [1, 2, 3]
            .into_iter()
            .map(|workers| {
                let jobs = Jobs {
                    workers,
                    size: Some(1 << 20),
                };
                // Level 3: at level 19 a job is at least as long as zstd's overlap between
                // jobs (16 MiB on libxul), longer than this whole file.
                let payload = encode_in(&old, &new, 3, Some(jobs)).expect("encode");
                payload.expect("zstd-prefix applies to any pair")
            })
            .collect();
        assert!(
            payloads.windows(2).all(|w| w[0] == w[1]),
            "same bytes on 1, 2, 3 workers"
        );
        let one_job = Jobs {
            workers: 1,
            size: Some(8 << 20),
        };
        let whole = encode_in(&old, &new, 3, Some(one_job))
            .expect("encode")
            .expect("applies");
        assert_ne!(whole, payloads[0], "jobs of 1 MiB are not one job");
        for payload in [&payloads[0], &whole] {
            let decoded = ZstdPrefix
                .decode(&old, payload, new.len() as u64)
                .expect("decode");
            assert!(decoded == new, "round trip");
            // 2 MiB of 14 letters take about 1 MB (3.8 bits each); the 3 moved MiB almost
            // nothing.
            let len = payload.len();
            assert!(
                len < 1_100_000,
                "{len} B for 3 MiB moved and 2 MiB of new text"
            );
        }
    }

    #[test]
    fn decodes_the_payload_as_it_comes_in() {
        use std::cell::Cell;
        use std::rc::Rc;

        /// Counts the payload bytes read so far.
        struct Counting<'a>(&'a [u8], Rc<Cell<usize>>);
        impl Read for Counting<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1.set(self.1.get() + n);
                Ok(n)
            }
        }
        /// Notes how much of the payload had been read when the first byte came out.
        struct FirstOut(Vec<u8>, Rc<Cell<usize>>, Option<usize>);
        impl Write for FirstOut {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.2.get_or_insert(self.1.get());
                self.0.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        // Noise does not compress: the payload is about as long as the new file.
        let old = text(3, 64 << 10);
        let new = crate::test_data::noise(4, 1 << 20);
        let payload = ZstdPrefix
            .encode(&old, &new)
            .expect("encode")
            .expect("applies");
        assert!(payload.len() > 4 * PAYLOAD_BUFFER, "{} B", payload.len());
        let read = Rc::new(Cell::new(0));
        let mut out = FirstOut(Vec::new(), read.clone(), None);
        let mut input = Counting(&payload, read.clone());
        ZstdPrefix
            .decode_stream_into(
                &old,
                &mut input,
                payload.len() as u64,
                new.len() as u64,
                &mut out,
            )
            .expect("decode");
        assert!(out.0 == new, "round trip");
        assert_eq!(read.get(), payload.len(), "the whole payload was read");
        let first = out.2.expect("bytes came out");
        assert!(
            first <= 2 * PAYLOAD_BUFFER,
            "first bytes out after {first} of {} payload bytes",
            payload.len()
        );
    }
}
