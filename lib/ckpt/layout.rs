//! The checks of a zerokit manifest's layout that both `ckpt inspect` (which reports them) and
//! `ckpt verify` (which fails on them) run.

use crate::zero::layout::FlatLayout;
use std::path::Path;

fn line(path: &Path, msg: &str) -> String {
    format!("{}: {msg}", path.display())
}

/// A manifest layout checked against the format's rules, without trusting any of its derived
/// numbers: parameter sizes, bucket membership and tiling, padding exactly as declared (each
/// bucket rounded up to a multiple of parts x ALIGN, no more), offsets and totals, and then
/// the partitions of every rank tiling every parameter exactly once. One line per problem.
pub fn layout_problems(l: &FlatLayout, file: &Path) -> Vec<String> {
    // Well-formedness is FlatLayout's own check (read_manifest runs it too); verify adds the
    // partitions' coverage below, which costs a pass per rank.
    let mut p: Vec<String> = l.problems().into_iter().map(|m| line(file, &format!("layout: {m}"))).collect();
    if !p.is_empty() {
        return p;
    }
    // The layout is well formed; now its partitions: within bounds, disjoint, and together
    // holding every element of every parameter exactly once.
    let mut covered: Vec<Vec<(usize, usize)>> = vec![Vec::new(); l.params.len()];
    for r in 0..l.parts {
        let mut pieces = l.pieces(r);
        pieces.sort_by_key(|pc| pc.partition_offset);
        let mut end = 0;
        for pc in &pieces {
            if pc.partition_offset < end || pc.partition_offset + pc.len > l.partition {
                p.push(line(
                    file,
                    &format!(
                        "layout: rank {r}'s partition: a piece of {} at {} overlaps another or exceeds {}",
                        l.params[pc.param].name, pc.partition_offset, l.partition
                    ),
                ));
            }
            end = pc.partition_offset + pc.len;
            covered[pc.param].push((pc.param_offset, pc.len));
        }
    }
    for (pi, c) in covered.iter_mut().enumerate() {
        c.sort();
        let mut pos = 0;
        for &(off, len) in c.iter() {
            if off != pos {
                p.push(line(
                    file,
                    &format!("layout: the partitions hold {} from element {off}, expected {pos}", l.params[pi].name),
                ));
            }
            pos = off + len;
        }
        if pos != l.params[pi].numel {
            p.push(line(
                file,
                &format!(
                    "layout: the partitions hold {pos} of {}'s {} elements",
                    l.params[pi].name, l.params[pi].numel
                ),
            ));
        }
    }
    p
}
