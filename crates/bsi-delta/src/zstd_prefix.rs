use std::io::{self, Write};

use zstd::stream::raw::{CParameter, DParameter};

use crate::{copy_exact_len, window_log, DecodeError, DeltaEncoder, LEVEL};

/// Largest new file encoded through zstd's multithreaded path (see `encode`).
const MULTITHREADED_MAX: usize = 64 << 20;
/// Smallest old file encoded through zstd's multithreaded path, exclusive (see `encode`).
const MULTITHREADED_MIN_OLD: usize = 8 << 20;

/// zstd with the old file as reference prefix (what `zstd --patch-from` does), in long mode with
/// a window that covers old and new file together.
#[derive(Debug, Clone, Copy)]
pub struct ZstdPrefix;

impl DeltaEncoder for ZstdPrefix {
    fn name(&self) -> &'static str {
        "zstd-prefix"
    }

    /// Level 19 with a long window runs at about 1 MB/s; beyond 1 MiB bsdiff is both smaller
    /// and several times faster, except between files with little in common (a browser library
    /// 13 major versions apart), where bsdiff's deltas are poor.
    fn max_new_len(&self) -> usize {
        1 << 20
    }

    fn covers_plain(&self) -> bool {
        true
    }

    fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let window = window_log(old.len() as u64 + new.len() as u64);
        let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), LEVEL, old)?;
        encoder.set_parameter(CParameter::WindowLog(window))?;
        encoder.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
        // One worker thread: zstd's multithreaded path (as the zstd program uses) lets long
        // distance matching see the prefix, which the single-threaded path does not. Firefox's
        // omni.ja (43 MB, ESR 140 -> 153): 1,848,351 B instead of 3,384,901 B. One worker, so
        // the output does not depend on the machine. Only where it paid: old files over 8 MiB
        // (on the security updates' smaller files it saved 26 bytes in all and cost 25% more
        // build time) and new files up to 64 MiB (on libxul, 184 MB, it saved 0.07% for 30% more
        // build time).
        if old.len() > MULTITHREADED_MIN_OLD && new.len() <= MULTITHREADED_MAX {
            encoder.set_parameter(CParameter::NbWorkers(1))?;
        }
        encoder.set_parameter(CParameter::ChecksumFlag(false))?;
        encoder.set_pledged_src_size(Some(new.len() as u64))?;
        encoder.write_all(new)?;
        encoder.finish().map(Some)
    }

    fn decode_into(
        &self,
        old: &[u8],
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let window = window_log(old.len() as u64 + new_len);
        let mut raw =
            zstd::stream::raw::Decoder::with_ref_prefix(old).map_err(DecodeError::Corrupt)?;
        raw.set_parameter(DParameter::WindowLogMax(window))
            .map_err(DecodeError::Corrupt)?;
        let decoder = zstd::stream::zio::Reader::new(io::BufReader::new(payload), raw);
        copy_exact_len(decoder, new_len, out)
    }
}
