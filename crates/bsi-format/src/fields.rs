//! How an [`Image`] and an [`Entry`] are parsed, written by hand. serde's derived forms of an
//! internally tagged enum (an image's `kind`) and of a flattened one (an entry's `op`) first
//! copy every field into a buffer of their own, then parse that: 19% of opening a package of
//! 150,750 entries went to those copies, and parsing journals and installed records paid the
//! same for each image. These read each field once, in any order, and refuse what the derived
//! forms refuse: an unknown field, a field twice, a field missing, a field of another kind.

use serde::de::{Deserialize, Deserializer, Error, MapAccess, Visitor};

use crate::manifest::{Entry, Image, Mtime, Operation, Payload, Source};
use crate::{Digest, Name, PkgPath};

/// The value of a field, refused if it was given already.
pub(crate) fn once<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    name: &'static str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(A::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

/// A field that must have been given.
fn given<T, E: Error>(slot: Option<T>, name: &'static str) -> Result<T, E> {
    slot.ok_or_else(|| E::missing_field(name))
}

#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum ImageField {
    Kind,
    Sha256,
    Size,
    Mode,
    Mtime,
    Target,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    File,
    Symlink,
    Dir,
}

const FILE_FIELDS: &[&str] = &["sha256", "size", "mode", "mtime"];
const SYMLINK_FIELDS: &[&str] = &["target", "mtime"];
const DIR_FIELDS: &[&str] = &["mode", "mtime"];

impl<'de> Deserialize<'de> for Image {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Image, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Image;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an image: a file, a symlink or a directory")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Image, A::Error> {
                let mut kind: Option<Kind> = None;
                let mut sha256: Option<Digest> = None;
                let mut size: Option<u64> = None;
                let mut mode: Option<u32> = None;
                let mut mtime: Option<Mtime> = None;
                let mut target: Option<String> = None;
                while let Some(field) = map.next_key()? {
                    match field {
                        ImageField::Kind => once(&mut map, &mut kind, "kind")?,
                        ImageField::Sha256 => once(&mut map, &mut sha256, "sha256")?,
                        ImageField::Size => once(&mut map, &mut size, "size")?,
                        ImageField::Mode => once(&mut map, &mut mode, "mode")?,
                        ImageField::Mtime => once(&mut map, &mut mtime, "mtime")?,
                        ImageField::Target => once(&mut map, &mut target, "target")?,
                    }
                }
                let mtime = given(mtime, "mtime")?;
                // A field that is not the kind's.
                let stray = |name: &'static str, expected: &'static [&'static str]| {
                    Err(A::Error::unknown_field(name, expected))
                };
                match given(kind, "kind")? {
                    Kind::File => match target {
                        Some(_) => stray("target", FILE_FIELDS),
                        None => Ok(Image::File {
                            sha256: given(sha256, "sha256")?,
                            size: given(size, "size")?,
                            mode: given(mode, "mode")?,
                            mtime,
                        }),
                    },
                    Kind::Symlink => match (sha256, size, mode) {
                        (Some(_), _, _) => stray("sha256", SYMLINK_FIELDS),
                        (_, Some(_), _) => stray("size", SYMLINK_FIELDS),
                        (_, _, Some(_)) => stray("mode", SYMLINK_FIELDS),
                        (None, None, None) => Ok(Image::Symlink {
                            target: given(target, "target")?,
                            mtime,
                        }),
                    },
                    Kind::Dir => match (sha256, size, target) {
                        (Some(_), _, _) => stray("sha256", DIR_FIELDS),
                        (_, Some(_), _) => stray("size", DIR_FIELDS),
                        (_, _, Some(_)) => stray("target", DIR_FIELDS),
                        (None, None, None) => Ok(Image::Dir {
                            mode: given(mode, "mode")?,
                            mtime,
                        }),
                    },
                }
            }
        }
        d.deserialize_map(Fields)
    }
}

#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum EntryField {
    Path,
    Component,
    Pre,
    Post,
    Op,
    Encoder,
    Source,
    Payload,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum OpName {
    Add,
    Delete,
    Replace,
    Delta,
    Metadata,
}

const OTHER_OP_FIELDS: &[&str] = &["path", "component", "pre", "post", "op", "payload"];
const PLAIN_OP_FIELDS: &[&str] = &[
    "path",
    "component",
    "pre",
    "post",
    "op",
    "encoder",
    "payload",
];

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Entry;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an entry")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
                let mut path: Option<PkgPath> = None;
                let mut component: Option<Name> = None;
                let mut pre: Option<Option<Image>> = None;
                let mut post: Option<Option<Image>> = None;
                let mut op: Option<OpName> = None;
                let mut encoder: Option<Name> = None;
                let mut source: Option<Option<Box<Source>>> = None;
                let mut payload: Option<Option<Box<Payload>>> = None;
                while let Some(field) = map.next_key()? {
                    match field {
                        EntryField::Path => once(&mut map, &mut path, "path")?,
                        EntryField::Component => once(&mut map, &mut component, "component")?,
                        EntryField::Pre => once(&mut map, &mut pre, "pre")?,
                        EntryField::Post => once(&mut map, &mut post, "post")?,
                        EntryField::Op => once(&mut map, &mut op, "op")?,
                        EntryField::Encoder => once(&mut map, &mut encoder, "encoder")?,
                        EntryField::Source => once(&mut map, &mut source, "source")?,
                        EntryField::Payload => once(&mut map, &mut payload, "payload")?,
                    }
                }
                let simple = |op: Operation| match (&encoder, &source) {
                    (Some(_), _) => Err(A::Error::unknown_field("encoder", OTHER_OP_FIELDS)),
                    (_, Some(_)) => Err(A::Error::unknown_field("source", OTHER_OP_FIELDS)),
                    (None, None) => Ok(op),
                };
                let no_source = || match &source {
                    Some(_) => Err(A::Error::unknown_field("source", PLAIN_OP_FIELDS)),
                    None => Ok(()),
                };
                let op = match given(op, "op")? {
                    OpName::Add => {
                        no_source()?;
                        Operation::Add { encoder }
                    }
                    OpName::Delete => simple(Operation::Delete)?,
                    OpName::Replace => {
                        no_source()?;
                        Operation::Replace { encoder }
                    }
                    OpName::Metadata => simple(Operation::Metadata)?,
                    OpName::Delta => Operation::Delta {
                        encoder: given(encoder, "encoder")?,
                        source: source.flatten(),
                    },
                };
                Ok(Entry {
                    path: given(path, "path")?,
                    component: given(component, "component")?,
                    // Missing is none, as a derived form reads an option.
                    pre: pre.flatten(),
                    post: post.flatten(),
                    op,
                    payload: payload.flatten(),
                })
            }
        }
        d.deserialize_map(Fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The derived forms these replace, as they were.
    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
    enum DerivedImage {
        File {
            sha256: Digest,
            size: u64,
            mode: u32,
            mtime: Mtime,
        },
        Symlink {
            target: String,
            mtime: Mtime,
        },
        Dir {
            mode: u32,
            mtime: Mtime,
        },
    }

    impl From<DerivedImage> for Image {
        fn from(d: DerivedImage) -> Image {
            match d {
                DerivedImage::File {
                    sha256,
                    size,
                    mode,
                    mtime,
                } => Image::File {
                    sha256,
                    size,
                    mode,
                    mtime,
                },
                DerivedImage::Symlink { target, mtime } => Image::Symlink { target, mtime },
                DerivedImage::Dir { mode, mtime } => Image::Dir { mode, mtime },
            }
        }
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
    enum DerivedOperation {
        Add {
            #[serde(default)]
            encoder: Option<Name>,
        },
        Delete,
        Replace {
            #[serde(default)]
            encoder: Option<Name>,
        },
        Delta {
            encoder: Name,
            #[serde(default)]
            source: Option<Box<Source>>,
        },
        Metadata,
    }

    #[derive(serde::Deserialize, Debug)]
    struct DerivedEntry {
        path: PkgPath,
        component: Name,
        pre: Option<DerivedImage>,
        post: Option<DerivedImage>,
        #[serde(flatten)]
        op: DerivedOperation,
        payload: Option<Box<Payload>>,
    }

    impl From<DerivedEntry> for Entry {
        fn from(d: DerivedEntry) -> Entry {
            Entry {
                path: d.path,
                component: d.component,
                pre: d.pre.map(Image::from),
                post: d.post.map(Image::from),
                op: match d.op {
                    DerivedOperation::Add { encoder } => Operation::Add { encoder },
                    DerivedOperation::Delete => Operation::Delete,
                    DerivedOperation::Replace { encoder } => Operation::Replace { encoder },
                    DerivedOperation::Delta { encoder, source } => {
                        Operation::Delta { encoder, source }
                    }
                    DerivedOperation::Metadata => Operation::Metadata,
                },
                payload: d.payload,
            }
        }
    }

    const DIGEST: &str = "\"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"";
    const MTIME: &str = "{\"secs\":5,\"nanos\":7}";

    /// Every combination of up to `most` of `fields`, in the order given and reversed, as the
    /// inside of a JSON object.
    fn objects(fields: &[String], most: usize) -> Vec<String> {
        let mut out = Vec::new();
        for mask in 0u32..1 << fields.len() {
            if mask.count_ones() as usize > most {
                continue;
            }
            let chosen: Vec<&String> = (0..fields.len())
                .filter(|i| mask & 1 << i != 0)
                .map(|i| &fields[i])
                .collect();
            let reversed: Vec<&String> = chosen.iter().rev().copied().collect();
            for order in [chosen, reversed] {
                let inside: Vec<&str> = order.iter().map(|f| f.as_str()).collect();
                out.push(format!("{{{}}}", inside.join(",")));
            }
        }
        out
    }

    #[test]
    fn an_image_is_read_as_the_derived_form_read_it() {
        let fields: Vec<String> = vec![
            "\"kind\":\"file\"".to_owned(),
            "\"kind\":\"symlink\"".to_owned(),
            "\"kind\":\"dir\"".to_owned(),
            "\"kind\":\"fifo\"".to_owned(),
            format!("\"sha256\":{DIGEST}"),
            "\"size\":12".to_owned(),
            "\"mode\":420".to_owned(),
            format!("\"mtime\":{MTIME}"),
            "\"target\":\"a/b\"".to_owned(),
            "\"other\":1".to_owned(),
            "\"size\":13".to_owned(),
            "\"mode\":null".to_owned(),
        ];
        let (mut accepted, mut refused) = (0, 0);
        for json in objects(&fields, 6) {
            let ours = serde_json::from_str::<Image>(&json);
            let derived = serde_json::from_str::<DerivedImage>(&json);
            match (ours, derived) {
                (Ok(ours), Ok(derived)) => {
                    assert_eq!(ours, Image::from(derived), "{json}");
                    accepted += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                (ours, derived) => panic!("{json}: ours {ours:?}, derived {derived:?}"),
            }
        }
        // Each kind is read in both orders at least.
        assert!(accepted >= 6, "{accepted} accepted");
        assert!(refused > 1000, "{refused} refused");
    }

    #[test]
    fn an_entry_is_read_as_the_derived_form_read_it_and_unknown_fields_refused() {
        let file = format!(
            "{{\"kind\":\"file\",\"sha256\":{DIGEST},\"size\":3,\"mode\":420,\"mtime\":{MTIME}}}"
        );
        let fields: Vec<String> = vec![
            "\"path\":\"a/b\"".to_owned(),
            "\"component\":\"c\"".to_owned(),
            format!("\"pre\":{file}"),
            "\"post\":null".to_owned(),
            "\"op\":\"delta\"".to_owned(),
            "\"op\":\"add\"".to_owned(),
            "\"encoder\":\"zstd\"".to_owned(),
            format!("\"source\":{{\"path\":\"x\",\"sha256\":{DIGEST},\"size\":3}}"),
            format!("\"payload\":{{\"offset\":0,\"len\":4,\"sha256\":{DIGEST}}}"),
            "\"path\":\"a/c\"".to_owned(),
        ];
        let (mut accepted, mut refused) = (0, 0);
        for json in objects(&fields, 8) {
            let ours = serde_json::from_str::<Entry>(&json);
            let derived = serde_json::from_str::<DerivedEntry>(&json);
            match (ours, derived) {
                (Ok(ours), Ok(derived)) => {
                    assert_eq!(ours, Entry::from(derived), "{json}");
                    let again = serde_json::to_string(&ours).unwrap_or_default();
                    assert_eq!(serde_json::from_str::<Entry>(&again).ok(), Some(ours));
                    accepted += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                // The derived form let a field of another operation through, but the entry it
                // read does not write back as what it read, which the canonical check refused.
                (Err(_), Ok(derived)) => {
                    let written = serde_json::to_string(&Entry::from(derived)).unwrap_or_default();
                    assert_ne!(written, json);
                    assert!(json.contains("\"encoder\"") || json.contains("\"source\""));
                    refused += 1;
                }
                (ours, derived) => panic!("{json}: ours {ours:?}, derived {derived:?}"),
            }
        }
        assert!(accepted >= 20, "{accepted} accepted");
        assert!(refused > 100, "{refused} refused");
        // The derived form let an unknown field through (the canonical check refused it).
        let unknown = format!(
            "{{\"path\":\"a\",\"component\":\"c\",\"pre\":{file},\"post\":null,\"op\":\"delete\",\"payload\":null,\"extra\":1}}"
        );
        assert!(serde_json::from_str::<DerivedEntry>(&unknown).is_ok());
        let refused = serde_json::from_str::<Entry>(&unknown).map(drop);
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("unknown field `extra`")),
            "{refused:?}"
        );
    }
}
