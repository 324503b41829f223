//! The column names the catalog showed for a held table, and when: what a schema version the
//! stream recorded is checked against (see `table_sync`'s `Held::name_never_shown`).
//!
//! pgoutput names a relation's columns but gives no attribute numbers, so a column renamed
//! and renamed back between two looks at the catalog, with writes under the passing name,
//! shows in the archive as one column gone and another come: rows written then cannot be
//! told from rows of another column, and the table must be read again. The looks are what
//! tells a passing name from a real one. A name some look once showed is not enough: a
//! column dropped long ago lends its name to a rename-and-back as well as a fresh one does.
//! So each name is kept with the spans of points in which the catalog may have held it, and a
//! version passes only with names held around its own point.

use std::collections::BTreeMap;

use pgtrail_store::Lsn;

/// Spans of points in which the catalog may have held each name.
#[derive(Debug, Default)]
pub(crate) struct ShownNames {
    /// Each name's spans `(from, until)`, oldest first, disjoint; `until` is `None` while the
    /// latest look still shows the name.
    spans: BTreeMap<String, Vec<(Lsn, Option<Lsn>)>>,
}

impl ShownNames {
    /// No name recorded (a layout of format 2, which kept no names): nothing to check with.
    pub(crate) fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The catalog shows `names`, which it may have held since `from`: a name not shown
    /// already is held from there on.
    pub(crate) fn show<'a>(&mut self, names: impl IntoIterator<Item = &'a String>, from: Lsn) {
        for name in names.into_iter().filter(|n| !n.is_empty()) {
            let spans = self.spans.entry(name.clone()).or_default();
            if spans.last().is_none_or(|(_, until)| until.is_some()) {
                spans.push((from, None));
            }
        }
    }

    /// A look shows exactly `names`: each name it shows is held from `from` on (the point
    /// read before the previous look: it came no earlier than that look's reading of the
    /// catalog), each other name the catalog held is no longer held after `until` (a point
    /// read after this look's reading of the catalog: whatever took it away committed before).
    pub(crate) fn look(&mut self, names: &[String], from: Lsn, until: Lsn) {
        // A set: a wide table (up to 1,600 columns) is looked at every second.
        let shown: std::collections::BTreeSet<&String> = names.iter().collect();
        for (name, spans) in &mut self.spans {
            if let Some((_, open @ None)) = spans.last_mut()
                && !shown.contains(name)
            {
                *open = Some(until);
            }
        }
        self.show(names, from);
    }

    /// Whether the catalog may have held `name` at `point`.
    pub(crate) fn held_at(&self, name: &str, point: Lsn) -> bool {
        self.spans.get(name).is_some_and(|spans| {
            spans
                .iter()
                .any(|(from, until)| *from <= point && until.is_none_or(|u| point <= u))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_name_passes_only_around_the_looks_that_showed_it() {
        let mut shown = ShownNames::default();
        assert!(shown.is_empty());
        // Read at 100 with columns v and gone; a look (read before at 200, after at 210)
        // finds gone dropped, then one at 300 (after 310) finds v renamed to w.
        shown.show(&names(&["v", "gone"]), Lsn(100));
        shown.look(&names(&["v"]), Lsn(100), Lsn(210));
        shown.look(&names(&["w"]), Lsn(200), Lsn(310));
        // gone: held from the read up to the look that no longer showed it.
        assert!(shown.held_at("gone", Lsn(100)));
        assert!(shown.held_at("gone", Lsn(210)));
        assert!(
            !shown.held_at("gone", Lsn(211)),
            "a dropped column's name, later"
        );
        assert!(!shown.held_at("gone", Lsn(99)), "before the read");
        // v until the rename's look, w from the look before it on.
        assert!(shown.held_at("v", Lsn(310)));
        assert!(!shown.held_at("v", Lsn(311)));
        assert!(shown.held_at("w", Lsn(200)));
        assert!(!shown.held_at("w", Lsn(199)));
        assert!(shown.held_at("w", Lsn(u64::MAX)), "still shown");
        assert!(!shown.held_at("tmp", Lsn(250)), "never shown");
    }

    #[test]
    fn a_name_shown_again_is_held_again_from_the_look_before() {
        let mut shown = ShownNames::default();
        shown.show(&names(&["a", "b"]), Lsn(10));
        shown.look(&names(&["a"]), Lsn(10), Lsn(25));
        shown.look(&names(&["a"]), Lsn(20), Lsn(35));
        shown.look(&names(&["a", "b"]), Lsn(30), Lsn(45));
        assert!(shown.held_at("b", Lsn(25)));
        assert!(!shown.held_at("b", Lsn(26)), "between its two spans");
        assert!(!shown.held_at("b", Lsn(29)));
        assert!(shown.held_at("b", Lsn(30)));
        // Shown again while still shown: one span, not two.
        shown.show(&names(&["a"]), Lsn(40));
        assert_eq!(shown.spans["a"], vec![(Lsn(10), None)]);
        // Empty names (a dropped column's place in a layout) are not names.
        shown.show(&names(&[""]), Lsn(50));
        assert!(!shown.spans.contains_key(""));
    }
}
