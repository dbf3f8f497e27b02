//! Checks of the kernel object against what the agent assumes about it.

use std::collections::BTreeSet;

use weir_common::schema::{self, MapKind, Sizing};

/// `BPF_MAP_TYPE_LPM_TRIE`.
const LPM_TRIE: u32 = 11;

/// Every map of the kernel object is declared in `weir_common::schema`
/// (so it is pinned and sized), and nothing else is.
#[test]
fn the_schema_declares_every_map_of_the_object() {
    let object = crate::datapath::kernel_object().expect("the agent embeds its kernel object");
    let obj = aya_obj::Object::parse(object).expect("the embedded kernel object parses");
    let in_object: BTreeSet<&str> = obj
        .maps
        .keys()
        .map(|n| n.as_str())
        .filter(|n| !n.starts_with('.') && !n.starts_with("AYA_"))
        .collect();
    let declared: BTreeSet<&str> = schema::maps().map(|m| m.name).collect();
    assert_eq!(
        in_object, declared,
        "maps of the object vs weir_common::schema"
    );
}

/// `--max-cidrs` says it sizes each CIDR map: every LPM trie of the
/// object is declared as an LPM trie sized by it, and nothing else is.
#[test]
fn max_cidrs_sizes_every_cidr_map_of_the_object() {
    let object = crate::datapath::kernel_object().expect("the agent embeds its kernel object");
    let obj = aya_obj::Object::parse(object).expect("the embedded kernel object parses");
    let tries: BTreeSet<&str> = obj
        .maps
        .iter()
        .filter(|(_, m)| m.map_type() == LPM_TRIE)
        .map(|(name, _)| name.as_str())
        .collect();
    let sized: BTreeSet<&str> = schema::maps()
        .filter(|m| m.sizing == Sizing::Cidrs)
        .map(|m| m.name)
        .collect();
    assert_eq!(tries, sized, "LPM tries of the object vs Sizing::Cidrs");
    for m in schema::maps().filter(|m| m.sizing == Sizing::Cidrs) {
        assert_eq!(m.kind, MapKind::LpmTrie, "{}", m.name);
    }
}
