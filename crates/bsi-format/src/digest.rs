use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A sha256 digest; serialised as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// The sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest {
    Digest(Sha256::digest(bytes).into())
}

impl Digest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest of 64 hex digits, either case. Read a pair of digits at a time through a
    /// table (the `hex` crate's decoding took 10% of opening a package of 150,750 entries).
    pub fn from_hex(text: &str) -> Option<Digest> {
        let text: &[u8; 64] = text.as_bytes().try_into().ok()?;
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
            let (high, low) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
            if (high | low) > 0xf {
                return None;
            }
            *byte = high << 4 | low;
        }
        Some(Digest(out))
    }
}

/// The value of each hex digit; 0xff for any other byte.
const NIBBLE: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl Serialize for Digest {
    /// Written from the stack: a string for each digest took 4% of checking that a manifest of
    /// 150,750 entries is canonical.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut text = [0u8; 64];
        hex::encode_to_slice(self.0, &mut text).map_err(serde::ser::Error::custom)?;
        s.serialize_str(std::str::from_utf8(&text).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for Digest {
    /// Read from the parser's own buffer where it has one, without a string of its own.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Digest;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256 digest in hex")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Digest, E> {
                Digest::from_hex(text)
                    .ok_or_else(|| E::custom(format!("invalid sha256 digest {text:?}")))
            }
        }
        d.deserialize_str(Hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_reads_back_from_its_hex_in_either_case() {
        for seed in 0..64u8 {
            let d = sha256(&[seed; 3]);
            assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
            assert_eq!(Digest::from_hex(&d.to_hex().to_uppercase()), Some(d));
            assert_eq!(hex::encode(d.0), d.to_hex());
        }
        let every_digit = "0123456789abcdefABCDEF".repeat(3);
        let expected: [u8; 32] = hex::decode(&every_digit[..64])
            .ok()
            .and_then(|v| v.try_into().ok())
            .unwrap_or_default();
        assert_eq!(Digest::from_hex(&every_digit[..64]), Some(Digest(expected)));
    }

    #[test]
    fn anything_but_64_hex_digits_is_no_digest() {
        let good = sha256(b"x").to_hex();
        for bad in [
            String::new(),
            good[..63].to_owned(),
            format!("{good}0"),
            format!("{}g", &good[..63]),
            format!("{} ", &good[..63]),
            format!("{}é", &good[..62]),
            format!("/{}", &good[1..]),
            format!(":{}", &good[1..]),
            format!("@{}", &good[1..]),
            format!("`{}", &good[1..]),
        ] {
            assert_eq!(Digest::from_hex(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_digest_parses_from_json_text_and_refuses_other_values() {
        let d = sha256(b"y");
        let json = serde_json::to_string(&d).unwrap_or_default();
        assert_eq!(json, format!("\"{}\"", d.to_hex()));
        assert_eq!(serde_json::from_str::<Digest>(&json).ok(), Some(d));
        for bad in ["12", "null", "\"ab\"", "[1,2]"] {
            assert!(serde_json::from_str::<Digest>(bad).is_err(), "{bad}");
        }
    }
}
