//! Checks of the kernel object against what the agent assumes about it.

use std::collections::BTreeSet;

use crate::datapath::{CIDR_MAPS, MAP_NAMES};

/// `BPF_MAP_TYPE_LPM_TRIE`.
const LPM_TRIE: u32 = 11;

/// `--max-cidrs` says it sizes each CIDR map: every LPM trie of the
/// object is in `CIDR_MAPS` (which `configure_loader` sizes), and nothing
/// else is.
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
    let sized: BTreeSet<&str> = CIDR_MAPS.iter().copied().collect();
    assert_eq!(tries, sized, "LPM tries of the object vs CIDR_MAPS");
    for m in CIDR_MAPS {
        assert!(MAP_NAMES.contains(m), "{m} is not pinned (MAP_NAMES)");
    }
}
