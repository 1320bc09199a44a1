use std::cell::RefCell;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A short name a manifest repeats from entry to entry: a component's, an encoder's. Its text
/// is shared by its clones, and a name parsed right after the same one on a thread shares
/// that one's text: the entries of a component follow one another, so that a tree of 100,500
/// entries holds a few names, not 100,500 strings of 24 bytes and their allocations.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(text: &str) -> Name {
        Name(Arc::from(text))
    }
}

impl From<String> for Name {
    fn from(text: String) -> Name {
        Name(Arc::from(text))
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(NameVisitor)
    }
}

thread_local! {
    /// The last name parsed on this thread.
    static LAST: RefCell<Option<Name>> = const { RefCell::new(None) };
}

struct NameVisitor;

impl serde::de::Visitor<'_> for NameVisitor {
    type Value = Name;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a name")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Name, E> {
        Ok(LAST.with_borrow_mut(|last| match last {
            Some(name) if *name == text => name.clone(),
            _ => last.insert(Name::from(text)).clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_parsed_after_the_same_one_shares_its_text() {
        let names: Vec<Name> =
            serde_json::from_str(r#"["webkit","webkit","safari","webkit","webkit"]"#)
                .expect("parsed");
        assert_eq!(names, ["webkit", "webkit", "safari", "webkit", "webkit"]);
        assert!(Arc::ptr_eq(&names[0].0, &names[1].0));
        assert!(!Arc::ptr_eq(&names[1].0, &names[3].0));
        assert!(Arc::ptr_eq(&names[3].0, &names[4].0));
        assert_eq!(
            serde_json::to_string(&names[2]).expect("serialised"),
            r#""safari""#
        );
    }
}
