//! A manifest parsed as it is read, each entry handed to an [`EntryStore`] as soon as it is
//! parsed and checked against the rules entries obey (its path after the one before, inside its
//! component, its operation consistent with its images, its payload right after the one
//! before). A store that keeps the entries elsewhere than in memory holds nothing of them: a
//! manifest of 150,750 entries parsed into a vector took 37 MB.

use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};

use crate::fields::once;
use crate::manifest::{BaseRelease, Component, Entry, Manifest, ManifestError};
use crate::{Letter, PkgPath};

/// Where a manifest's entries are put as they are parsed, in order (see
/// [`Manifest::from_packed_into`]).
pub trait EntryStore {
    /// Keep `entry`, the next in path order; on failure, why it could not be kept.
    fn push(&mut self, entry: Entry) -> Result<(), String>;

    /// No entry follows.
    fn done(&mut self) -> Result<(), String> {
        Ok(())
    }
}

impl EntryStore for Vec<Entry> {
    fn push(&mut self, entry: Entry) -> Result<(), String> {
        Vec::push(self, entry);
        Ok(())
    }

    fn done(&mut self) -> Result<(), String> {
        // Grown by doubling: 50,250 entries took 16.8 MB for 12.9.
        self.shrink_to_fit();
        Ok(())
    }
}

/// The rules a manifest's entries obey in order, checked one entry at a time.
pub(crate) struct EntryRules<'c> {
    components: &'c [Component],
    previous: Option<PkgPath>,
    next_offset: u64,
}

impl<'c> EntryRules<'c> {
    pub(crate) fn new(components: &'c [Component]) -> EntryRules<'c> {
        EntryRules {
            components,
            previous: None,
            next_offset: 0,
        }
    }

    /// Check `entry`, the next one.
    pub(crate) fn check(&mut self, entry: &Entry) -> Result<(), ManifestError> {
        if self.previous.as_ref().is_some_and(|p| p >= &entry.path) {
            return Err(ManifestError::EntryOrder(entry.path.clone()));
        }
        self.previous = Some(entry.path.clone());
        let holds = self
            .components
            .iter()
            .any(|c| c.name == entry.component && entry.path.is_within(&c.path));
        if !holds {
            return Err(ManifestError::EntryComponent {
                path: entry.path.clone(),
                component: entry.component.to_string(),
            });
        }
        entry.check_consistent()?;
        if let Some(payload) = &entry.payload {
            if payload.offset != self.next_offset {
                return Err(ManifestError::PayloadGap {
                    path: entry.path.clone(),
                    offset: payload.offset,
                    expected: self.next_offset,
                });
            }
            self.next_offset = self.next_offset.checked_add(payload.len).ok_or_else(|| {
                ManifestError::PayloadOverflow {
                    path: entry.path.clone(),
                }
            })?;
        }
        Ok(())
    }

    /// After the last entry: the payloads cover exactly the `declared` section.
    pub(crate) fn finish(&self, declared: u64) -> Result<(), ManifestError> {
        covers(self.next_offset, declared)
    }
}

/// Payloads that cover `covered` bytes cover exactly the `declared` section.
pub(crate) fn covers(covered: u64, declared: u64) -> Result<(), ManifestError> {
    match covered == declared {
        true => Ok(()),
        false => Err(ManifestError::PayloadLength { covered, declared }),
    }
}

/// A manifest parsed with its entries in a store, and what the entries' rules found: the
/// first rule an entry breaks, else the bytes their payloads cover (`None`: the entries came
/// before the components, which the canonical form never does).
pub(crate) struct Parsed<S> {
    pub manifest: Manifest<S>,
    pub entries: Option<Result<u64, ManifestError>>,
}

#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Format,
    Product,
    Base,
    Letter,
    Signer,
    Components,
    Entries,
    PayloadLen,
}

const FIELDS: &[&str] = &[
    "format",
    "product",
    "base",
    "letter",
    "signer",
    "components",
    "entries",
    "payload_len",
];

/// Parse a manifest from `de`, its entries pushed into `store`; a store's failure is put in
/// `failed` (the parser then fails too).
pub(crate) fn parse<'de, S: EntryStore, D: Deserializer<'de>>(
    de: D,
    store: S,
    failed: &mut Option<String>,
) -> Result<Parsed<S>, D::Error> {
    de.deserialize_struct(
        "Manifest",
        FIELDS,
        Top {
            store: Some(store),
            failed,
        },
    )
}

struct Top<'f, S> {
    store: Option<S>,
    failed: &'f mut Option<String>,
}

impl<'de, S: EntryStore> Visitor<'de> for Top<'_, S> {
    type Value = Parsed<S>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("struct Manifest")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Parsed<S>, A::Error> {
        let mut format: Option<u32> = None;
        let mut product: Option<String> = None;
        let mut base: Option<BaseRelease> = None;
        let mut letter: Option<Letter> = None;
        let mut signer: Option<String> = None;
        let mut components: Option<Vec<Component>> = None;
        let mut entries: Option<S> = None;
        let mut rules: Option<Result<u64, ManifestError>> = None;
        let mut payload_len: Option<u64> = None;
        while let Some(field) = map.next_key()? {
            match field {
                Field::Format => once(&mut map, &mut format, "format")?,
                Field::Product => once(&mut map, &mut product, "product")?,
                Field::Base => once(&mut map, &mut base, "base")?,
                Field::Letter => once(&mut map, &mut letter, "letter")?,
                Field::Signer => once(&mut map, &mut signer, "signer")?,
                Field::Components => once(&mut map, &mut components, "components")?,
                Field::PayloadLen => once(&mut map, &mut payload_len, "payload_len")?,
                Field::Entries => {
                    let Some(mut store) = self.store.take() else {
                        return Err(A::Error::duplicate_field("entries"));
                    };
                    let mut seed = IntoStore {
                        store: &mut store,
                        rules: components.as_deref().map(EntryRules::new),
                        invalid: None,
                        failed: &mut *self.failed,
                    };
                    map.next_value_seed(&mut seed)?;
                    let invalid = seed.invalid;
                    rules = seed.rules.map(|r| invalid.map_or(Ok(r.next_offset), Err));
                    entries = Some(store);
                }
            }
        }
        let missing = A::Error::missing_field;
        let payload_len = payload_len.ok_or_else(|| missing("payload_len"))?;
        Ok(Parsed {
            manifest: Manifest {
                format: format.ok_or_else(|| missing("format"))?,
                product: product.ok_or_else(|| missing("product"))?,
                base: base.ok_or_else(|| missing("base"))?,
                letter: letter.ok_or_else(|| missing("letter"))?,
                signer: signer.ok_or_else(|| missing("signer"))?,
                components: components.ok_or_else(|| missing("components"))?,
                entries: entries.ok_or_else(|| missing("entries"))?,
                payload_len,
            },
            entries: rules,
        })
    }
}

/// The entries' array, each entry checked and pushed into a store as it is parsed.
struct IntoStore<'a, 'c, S> {
    store: &'a mut S,
    rules: Option<EntryRules<'c>>,
    /// The first entry's rule broken: the rest are still parsed (a parse error, or the
    /// manifest not being canonical, is told first).
    invalid: Option<ManifestError>,
    failed: &'a mut Option<String>,
}

impl<'de, S: EntryStore> DeserializeSeed<'de> for &mut IntoStore<'_, '_, S> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de, S: EntryStore> Visitor<'de> for &mut IntoStore<'_, '_, S> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut keep = |result: Result<(), String>| {
            result.map_err(|why| {
                let error = A::Error::custom(&why);
                *self.failed = Some(why);
                error
            })
        };
        while let Some(entry) = seq.next_element::<Entry>()? {
            if let (Some(rules), None) = (&mut self.rules, &self.invalid) {
                self.invalid = rules.check(&entry).err();
            }
            keep(self.store.push(entry))?;
        }
        keep(self.store.done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack_manifest;

    /// A store that keeps what it is given, failing at the entry of index `fail_at`.
    #[derive(Default)]
    struct Kept {
        entries: Vec<Entry>,
        fail_at: Option<usize>,
        done: bool,
    }

    impl serde::Serialize for Kept {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(&self.entries)
        }
    }

    impl EntryStore for Kept {
        fn push(&mut self, entry: Entry) -> Result<(), String> {
            if self.fail_at == Some(self.entries.len()) {
                return Err("the disk is full".to_owned());
            }
            self.entries.push(entry);
            Ok(())
        }

        fn done(&mut self) -> Result<(), String> {
            self.done = true;
            Ok(())
        }
    }

    /// Canonical manifest JSON whose entries (changes of time of directories) have `paths`.
    fn manifest(paths: &[&str]) -> String {
        let entries: Vec<String> = paths
            .iter()
            .map(|p| {
                let dir = |secs| format!(r#"{{"kind":"dir","mode":493,"mtime":{{"secs":{secs},"nanos":0}}}}"#);
                format!(
                    r#"{{"path":"{p}","component":"webkit","pre":{},"post":{},"op":"metadata","payload":null}}"#,
                    dir(1000),
                    dir(2000)
                )
            })
            .collect();
        format!(
            r#"{{"format":1,"product":"macOS","base":{{"version":"26.3","build":null}},"letter":"a","signer":"df0f1484c5634cb1","components":[{{"name":"webkit","path":""}}],"entries":[{}],"payload_len":0}}"#,
            entries.join(",")
        )
    }

    fn parse_into(json: &str, store: Kept) -> Result<Manifest<Kept>, ManifestError> {
        Manifest::from_packed_into(&pack_manifest(json.as_bytes()), store)
    }

    #[test]
    fn entries_reach_the_store_in_order_and_it_is_told_the_end() {
        let json = manifest(&["a", "a/b", "c"]);
        let kept = parse_into(&json, Kept::default()).expect("a valid manifest");
        assert!(kept.entries.done);
        let held = Manifest::from_bytes(json.as_bytes()).expect("a valid manifest");
        assert_eq!(kept.entries.entries, held.entries);
        assert_eq!(kept.to_canonical_bytes(), json.as_bytes());
    }

    #[test]
    fn a_store_that_fails_stops_the_parse_with_its_reason() {
        let failing = Kept {
            fail_at: Some(1),
            ..Kept::default()
        };
        match parse_into(&manifest(&["a", "b", "c"]), failing) {
            Err(ManifestError::Store(why)) => assert_eq!(why, "the disk is full"),
            other => panic!("{:?}", other.map(|m| m.entries.entries)),
        }
    }

    /// An entry that breaks a rule is told once the manifest is known to be canonical, as a
    /// manifest parsed whole and then checked tells it; entries before the components, which
    /// cannot be checked as they come, are not canonical.
    #[test]
    fn a_broken_entry_is_told_after_the_manifest_is_found_canonical() {
        let out_of_order = manifest(&["b", "a"]);
        assert!(matches!(
            parse_into(&out_of_order, Kept::default()),
            Err(ManifestError::EntryOrder(p)) if p.as_str() == "a"
        ));
        assert!(matches!(
            Manifest::from_bytes(out_of_order.as_bytes()),
            Err(ManifestError::EntryOrder(p)) if p.as_str() == "a"
        ));
        let spaced = out_of_order.replacen(r#""format":1"#, r#""format": 1"#, 1);
        assert!(matches!(
            parse_into(&spaced, Kept::default()),
            Err(ManifestError::NotCanonical)
        ));
        let json = manifest(&["a"]);
        let components = r#""components":[{"name":"webkit","path":""}],"#;
        let (head, entries) = json.split_once(components).expect("components");
        let (entries, tail) = entries.split_once(r#","payload_len""#).expect("entries");
        let reordered = format!(r#"{head}{entries},{}"payload_len"{tail}"#, components);
        assert!(matches!(
            parse_into(&reordered, Kept::default()),
            Err(ManifestError::NotCanonical)
        ));
        let twice = json.replacen(r#""payload_len""#, r#""entries":[],"payload_len""#, 1);
        assert!(matches!(
            parse_into(&twice, Kept::default()),
            Err(ManifestError::Json(e)) if e.to_string().contains("duplicate field `entries`")
        ));
    }
}
