//! [`Labels`]: the labels or annotations of an inventory item, a small map kept as one sorted
//! vector.
//!
//! An inventory hands the sweep every backend object at once, and each object carries a label or
//! two. A `BTreeMap` allocates a whole node (room for eleven entries, 544 bytes) for its first
//! entry, so 100 000 items with one label each held about 50 MiB of mostly empty nodes; one
//! vector holds the same entries in 48 bytes each.

use std::collections::BTreeMap;
use std::fmt;

/// String keys to string values, each key at most once, iterated in key order.
///
/// Used for both the labels and the annotations of an [`crate::InventoryItem`]. Build it with
/// [`Labels::insert`], from a `BTreeMap` (`From`), or from pairs (`FromIterator`, where a later
/// pair replaces an earlier one with the same key, as in a map).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels {
    /// Sorted by key, keys unique.
    entries: Vec<(String, String)>,
}

impl Labels {
    /// No entries.
    pub const fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces, if any.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                // Exactly the room needed: an item's labels are set once and then only read.
                self.entries.reserve_exact(1);
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    /// Removes `key`; returns its value, if it was present.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        // A BTreeMap iterates in key order with unique keys: already what `entries` holds.
        Self {
            entries: map.into_iter().collect(),
        }
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(labels: Labels) -> Self {
        labels.entries.into_iter().collect()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut labels = Self::new();
        for (k, v) in pairs {
            labels.insert(k.into(), v.into());
        }
        labels
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_behave_as_a_map_in_key_order() {
        let mut labels = Labels::new();
        assert!(labels.is_empty());
        assert_eq!(labels.insert("b".into(), "2".into()), None);
        assert_eq!(labels.insert("a".into(), "1".into()), None);
        assert_eq!(labels.insert("c".into(), "3".into()), None);
        assert_eq!(
            labels.insert("b".into(), "two".into()),
            Some("2".to_owned())
        );
        assert_eq!(labels.len(), 3);
        assert_eq!(labels.get("b").map(String::as_str), Some("two"));
        assert_eq!(labels.get("z"), None);
        assert!(labels.contains_key("a") && !labels.contains_key("z"));
        let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(labels.remove("a"), Some("1".to_owned()));
        assert_eq!(labels.remove("a"), None);

        // The same entries as a BTreeMap, both ways, and from pairs with a repeated key.
        let map: BTreeMap<String, String> = labels.clone().into();
        assert_eq!(Labels::from(map.clone()), labels);
        let from_pairs: Labels = [("c", "3"), ("b", "2"), ("b", "two")].into_iter().collect();
        assert_eq!(from_pairs, labels);
        assert_eq!(format!("{labels:?}"), format!("{map:?}"));

        // Serialized as a JSON object, read back the same.
        let json = serde_json::to_string(&labels).expect("serialize");
        assert_eq!(json, r#"{"b":"two","c":"3"}"#);
        let back: Labels = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, labels);
        labels.clear();
        assert!(labels.is_empty());
    }

    /// One entry costs one entry's room: no node with space for eleven (a `BTreeMap`'s first
    /// allocation), no spare slots, so an inventory of 100 000 labelled items stays small.
    #[test]
    fn labels_hold_no_spare_room() {
        let mut labels = Labels::new();
        for (n, key) in ["managed-by", "installation", "resource-type"]
            .into_iter()
            .enumerate()
        {
            labels.insert(key.to_owned(), "v".to_owned());
            assert_eq!(labels.entries.capacity(), n + 1);
        }
        let from_map = Labels::from(BTreeMap::from([("k".to_owned(), "v".to_owned())]));
        assert_eq!(from_map.entries.capacity(), 1);
        assert_eq!(
            std::mem::size_of::<Labels>(),
            std::mem::size_of::<Vec<(String, String)>>()
        );
    }
}
