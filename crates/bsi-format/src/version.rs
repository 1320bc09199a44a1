use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("release version {0:?} is not dotted numbers such as 26.3 or 26.3.1")]
    Version(String),
    #[error("letter {0:?} is not a single lower-case letter from a to z")]
    Letter(String),
    #[error("lettered version {0:?} is not of the form `26.3 (a)`")]
    Lettered(String),
}

/// A full release version such as `26.3` or `26.3.1`: one to four dotted numbers, compared
/// numerically (`26.10` > `26.9`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(Vec<u32>);

impl Version {
    pub fn parts(&self) -> &[u32] {
        &self.0
    }
}

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<Version, VersionError> {
        let bad = || VersionError::Version(text.to_owned());
        let parts: Vec<&str> = text.split('.').collect();
        if parts.is_empty() || parts.len() > 4 {
            return Err(bad());
        }
        let mut numbers = Vec::with_capacity(parts.len());
        for part in parts {
            // Digits only, no sign, no leading zeros: one spelling per version.
            let canonical = !part.is_empty()
                && part.len() <= 9
                && part.bytes().all(|b| b.is_ascii_digit())
                && (part == "0" || !part.starts_with('0'));
            if !canonical {
                return Err(bad());
            }
            numbers.push(part.parse().map_err(|_| bad())?);
        }
        Ok(Version(numbers))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        // 26.3 == 26.3.0 is not wanted: a shorter version sorts first when it is a prefix.
        self.0.cmp(&other.0)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// The letter of a patch, `a` to `z`; `b` supersedes `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Letter(u8);

impl Letter {
    pub fn as_char(self) -> char {
        char::from(self.0)
    }
}

impl FromStr for Letter {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<Letter, VersionError> {
        match text.as_bytes() {
            [b @ b'a'..=b'z'] => Ok(Letter(*b)),
            _ => Err(VersionError::Letter(text.to_owned())),
        }
    }
}

impl fmt::Display for Letter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// A release and a letter: `26.3 (a)`. Ordered by release, then letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LetteredVersion {
    pub version: Version,
    pub letter: Letter,
}

impl FromStr for LetteredVersion {
    type Err = VersionError;

    fn from_str(text: &str) -> Result<LetteredVersion, VersionError> {
        let bad = || VersionError::Lettered(text.to_owned());
        let (version, rest) = text.split_once(" (").ok_or_else(bad)?;
        let letter = rest.strip_suffix(')').ok_or_else(bad)?;
        Ok(LetteredVersion {
            version: version.parse()?,
            letter: letter.parse()?,
        })
    }
}

impl fmt::Display for LetteredVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.version, self.letter)
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_via_str!(Version);
serde_via_str!(Letter);
serde_via_str!(LetteredVersion);

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(text: &str) -> LetteredVersion {
        text.parse().expect("valid lettered version")
    }

    #[test]
    fn parses_and_prints_round_trip() {
        for text in ["26.3 (a)", "26.3 (z)", "26.3.1 (b)", "9 (c)", "26.10 (a)"] {
            assert_eq!(lv(text).to_string(), text);
        }
    }

    #[test]
    fn orders_by_release_then_letter() {
        assert!(lv("26.3 (a)") < lv("26.3 (b)"));
        assert!(lv("26.3 (z)") < lv("26.4 (a)"));
        assert!(lv("26.9 (a)") < lv("26.10 (a)"));
        assert!(lv("26.3 (z)") < lv("26.3.1 (a)"));
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        for bad in ["", "A", "aa", "é", "1", "{"] {
            assert_eq!(
                bad.parse::<Letter>(),
                Err(VersionError::Letter(bad.to_owned()))
            );
        }
        for bad in [
            "26.3",
            "26.3(a)",
            "26.3 (a",
            "26.3 (A)",
            "26.3 ()",
            "x (a)",
            "26.03 (a)",
            "26..3 (a)",
            "-1 (a)",
            "26.3 (a) ",
        ] {
            assert!(
                bad.parse::<LetteredVersion>().is_err(),
                "{bad:?} was accepted"
            );
        }
        assert!("26.3.1.1.1".parse::<Version>().is_err());
        assert!("99999999999".parse::<Version>().is_err());
    }
}
