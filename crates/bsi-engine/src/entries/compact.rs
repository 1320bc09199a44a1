//! The form entries are kept aside in: read back only by the process that wrote them, so it
//! has no version and no field names. Read back as JSON, 150,750 entries took about 0.25 s a
//! walk, and an apply walks them four times, a switch five.
//!
//! Numbers are LEB128 (times' seconds zigzag first), texts their length then their bytes,
//! digests their 32 bytes; an image, an operation and a payload start with a tag.

use bsi_format::{Digest, Entry, Image, Mtime, Name, Operation, Payload, PkgPath, Source};

/// Append `entry` to `out`.
pub(super) fn put(out: &mut Vec<u8>, entry: &Entry) {
    put_str(out, entry.path.as_str());
    put_str(out, &entry.component);
    put_image(out, entry.pre.as_ref());
    put_image(out, entry.post.as_ref());
    match &entry.op {
        Operation::Add { encoder: None } => out.push(0),
        Operation::Delete => out.push(1),
        Operation::Replace { encoder: None } => out.push(2),
        Operation::Metadata => out.push(3),
        Operation::Add {
            encoder: Some(encoder),
        } => {
            out.push(5);
            put_str(out, encoder);
        }
        Operation::Replace {
            encoder: Some(encoder),
        } => {
            out.push(6);
            put_str(out, encoder);
        }
        Operation::Delta { encoder, source } => {
            out.push(4);
            put_str(out, encoder);
            match source {
                None => out.push(0),
                Some(src) => {
                    out.push(1);
                    put_str(out, src.path.as_str());
                    out.extend_from_slice(&src.sha256.0);
                    put_u64(out, src.size);
                }
            }
        }
    }
    match &entry.payload {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            put_u64(out, p.offset);
            put_u64(out, p.len);
            out.extend_from_slice(&p.sha256.0);
        }
    }
}

fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_u64(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn put_mtime(out: &mut Vec<u8>, mtime: Mtime) {
    put_u64(out, ((mtime.secs << 1) ^ (mtime.secs >> 63)) as u64);
    put_u64(out, u64::from(mtime.nanos));
}

fn put_image(out: &mut Vec<u8>, image: Option<&Image>) {
    match image {
        None => out.push(0),
        Some(Image::File {
            sha256,
            size,
            mode,
            mtime,
        }) => {
            out.push(1);
            out.extend_from_slice(&sha256.0);
            put_u64(out, *size);
            put_u64(out, u64::from(*mode));
            put_mtime(out, *mtime);
        }
        Some(Image::Symlink { target, mtime }) => {
            out.push(2);
            put_str(out, target);
            put_mtime(out, *mtime);
        }
        Some(Image::Dir { mode, mtime }) => {
            out.push(3);
            put_u64(out, u64::from(*mode));
            put_mtime(out, *mtime);
        }
    }
}

/// Entries read back from bytes [`put`] wrote; the names of one entry shared with the next's
/// where they are the same, as a manifest parsed shares them.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    component: Option<Name>,
    encoder: Option<Name>,
}

/// Why bytes read back are not entries.
pub(super) const DAMAGED: &str = "they are not what was written";

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader {
            bytes,
            component: None,
            encoder: None,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if n > self.bytes.len() {
            return Err(DAMAGED);
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(n);
            }
        }
        Err(DAMAGED)
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        u32::try_from(self.u64()?).map_err(|_| DAMAGED)
    }

    fn str(&mut self) -> Result<&'a str, &'static str> {
        let len = usize::try_from(self.u64()?).map_err(|_| DAMAGED)?;
        std::str::from_utf8(self.take(len)?).map_err(|_| DAMAGED)
    }

    fn path(&mut self) -> Result<PkgPath, &'static str> {
        PkgPath::new(self.str()?).map_err(|_| DAMAGED)
    }

    fn digest(&mut self) -> Result<Digest, &'static str> {
        let mut d = [0; 32];
        d.copy_from_slice(self.take(32)?);
        Ok(Digest(d))
    }

    fn mtime(&mut self) -> Result<Mtime, &'static str> {
        let z = self.u64()?;
        let secs = (z >> 1) as i64 ^ -((z & 1) as i64);
        Ok(Mtime {
            secs,
            nanos: self.u32()?,
        })
    }

    /// A name, shared with the one `last` keeps where it is the same.
    fn name(&mut self, last: fn(&mut Self) -> &mut Option<Name>) -> Result<Name, &'static str> {
        let text = self.str()?;
        let slot = last(self);
        match slot {
            Some(name) if name.as_str() == text => Ok(name.clone()),
            _ => Ok(slot.insert(Name::from(text)).clone()),
        }
    }

    fn image(&mut self) -> Result<Option<Image>, &'static str> {
        Ok(match self.byte()? {
            0 => None,
            1 => Some(Image::File {
                sha256: self.digest()?,
                size: self.u64()?,
                mode: self.u32()?,
                mtime: self.mtime()?,
            }),
            2 => Some(Image::Symlink {
                target: self.str()?.to_owned(),
                mtime: self.mtime()?,
            }),
            3 => Some(Image::Dir {
                mode: self.u32()?,
                mtime: self.mtime()?,
            }),
            _ => return Err(DAMAGED),
        })
    }

    /// The next entry.
    pub(super) fn entry(&mut self) -> Result<Entry, &'static str> {
        let path = self.path()?;
        let component = self.name(|r| &mut r.component)?;
        let pre = self.image()?;
        let post = self.image()?;
        let op = match self.byte()? {
            0 => Operation::ADD,
            1 => Operation::Delete,
            2 => Operation::REPLACE,
            3 => Operation::Metadata,
            5 => Operation::Add {
                encoder: Some(self.name(|r| &mut r.encoder)?),
            },
            6 => Operation::Replace {
                encoder: Some(self.name(|r| &mut r.encoder)?),
            },
            4 => Operation::Delta {
                encoder: self.name(|r| &mut r.encoder)?,
                source: match self.byte()? {
                    0 => None,
                    1 => Some(Box::new(Source {
                        path: self.path()?,
                        sha256: self.digest()?,
                        size: self.u64()?,
                    })),
                    _ => return Err(DAMAGED),
                },
            },
            _ => return Err(DAMAGED),
        };
        let payload = match self.byte()? {
            0 => None,
            1 => Some(Box::new(Payload {
                offset: self.u64()?,
                len: self.u64()?,
                sha256: self.digest()?,
            })),
            _ => return Err(DAMAGED),
        };
        Ok(Entry {
            path,
            component,
            pre,
            post,
            op,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries of every shape: each kind of image, each operation, a delta with and without a
    /// source, a payload, times before the epoch, numbers at their limits.
    fn shapes() -> Vec<Entry> {
        let path = |p: &str| PkgPath::new(p).expect("a path");
        let digest = |b: u8| Digest([b; 32]);
        let time = |secs, nanos| Mtime { secs, nanos };
        let file = Image::File {
            sha256: digest(1),
            size: u64::MAX,
            mode: u32::MAX,
            mtime: time(i64::MIN, 999_999_999),
        };
        let link = Image::Symlink {
            target: "../lib/libwebkit.so.6 é".to_owned(),
            mtime: time(-1, 0),
        };
        let dir = Image::Dir {
            mode: 0o755,
            mtime: time(i64::MAX, 7),
        };
        let payload = Payload {
            offset: 1 << 40,
            len: 127,
            sha256: digest(2),
        };
        let entry = |p: &str, pre: Option<&Image>, post: Option<&Image>, op, payload| Entry {
            path: path(p),
            component: Name::from(p.split('/').next().unwrap_or("root")),
            pre: pre.cloned(),
            post: post.cloned(),
            op,
            payload,
        };
        let delta = |source| Operation::Delta {
            encoder: Name::from("bsdiff"),
            source,
        };
        let source = Source {
            path: path("z/old.so"),
            sha256: digest(3),
            size: 128,
        };
        vec![
            entry("a", None, Some(&dir), Operation::ADD, None),
            entry(
                "a/f",
                None,
                Some(&file),
                Operation::ADD,
                Some(Box::new(payload.clone())),
            ),
            entry(
                "a/g",
                None,
                Some(&file),
                Operation::Add {
                    encoder: Some(Name::from("zstd-prefix")),
                },
                Some(Box::new(payload.clone())),
            ),
            entry("a/l", Some(&link), None, Operation::Delete, None),
            entry("b/f", Some(&file), Some(&link), Operation::REPLACE, None),
            entry(
                "b/fa",
                Some(&link),
                Some(&file),
                Operation::Replace {
                    encoder: Some(Name::from("zstd-prefix")),
                },
                Some(Box::new(payload.clone())),
            ),
            entry("b/g", Some(&file), Some(&file), Operation::Metadata, None),
            entry(
                "b/h",
                Some(&file),
                Some(&file),
                delta(None),
                Some(Box::new(payload.clone())),
            ),
            entry(
                "c/h",
                None,
                Some(&file),
                delta(Some(Box::new(source))),
                Some(Box::new(payload)),
            ),
        ]
    }

    #[test]
    fn entries_read_back_as_they_were_put() {
        let entries = shapes();
        let mut bytes = Vec::new();
        for e in &entries {
            put(&mut bytes, e);
        }
        let mut reader = Reader::new(&bytes);
        for e in &entries {
            assert_eq!(&reader.entry().expect("an entry"), e);
        }
        assert!(reader.is_empty());
    }

    /// Bytes cut short, or with a byte changed, are refused or read as other entries; they never
    /// panic.
    #[test]
    fn damaged_bytes_are_refused_without_panicking() {
        let mut bytes = Vec::new();
        for e in &shapes() {
            put(&mut bytes, e);
        }
        let read_all = |bytes: &[u8]| -> Result<usize, &'static str> {
            let mut reader = Reader::new(bytes);
            let mut n = 0;
            while !reader.is_empty() {
                reader.entry()?;
                n += 1;
            }
            Ok(n)
        };
        assert_eq!(read_all(&bytes), Ok(shapes().len()));
        for cut in 0..bytes.len() {
            let short = read_all(&bytes[..cut]);
            assert!(short.is_err() || short < Ok(shapes().len()), "{cut}");
        }
        for at in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 0xff;
            let _ = read_all(&changed);
        }
    }
}
