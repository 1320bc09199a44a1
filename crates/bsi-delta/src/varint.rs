//! LEB128 varints and zigzag signed integers, shared by the payload formats.

use std::io::Read;

use crate::DecodeError;

pub(crate) fn put(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Read a varint from the front of `input` and advance it.
pub(crate) fn take(input: &mut &[u8]) -> Result<u64, DecodeError> {
    read(input)
}

/// Read a varint from `r`; at most 10 bytes, and no bits beyond 64.
pub(crate) fn read(r: &mut impl Read) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte).map_err(DecodeError::Corrupt)?;
        let bits = u64::from(byte[0] & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(crate::corrupt("varint overflows 64 bits"));
        }
        value |= bits << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(crate::corrupt("varint longer than 10 bytes"))
}

pub(crate) fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

pub(crate) fn unzigzag(value: u64) -> i64 {
    (value >> 1) as i64 ^ -((value & 1) as i64)
}
