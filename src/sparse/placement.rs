//! Where each part of a model lives under a VRAM budget.
//!
//! The budget is spent in a fixed order: the parts every token needs whatever it activates
//! (attention, norms, embeddings/output, the KV cache, scratch buffers, predictors), then FFN
//! neurons by how often they fire, across all layers at once. With every neuron costing the
//! same within a layer, picking the most-firing neurons that fit is PowerInfer's knapsack;
//! ember takes them greedily by firing count per byte, which is exact when the per-neuron cost
//! is the same in every layer (the usual case) and within one neuron of optimal otherwise.

use std::fmt;

/// A part of the model that must be on the GPU before any FFN neuron is placed.
#[derive(Clone, Debug)]
pub struct FixedPart {
    pub name: String,
    pub bytes: u64,
}

/// What the placement needs to know about a model and a GPU session.
#[derive(Clone, Debug)]
pub struct PlacementInput {
    /// Parts placed first, in order.
    pub fixed: Vec<FixedPart>,
    /// Per layer: GPU bytes one FFN neuron takes there (its gate row, up row, down row in the
    /// GPU layout, plus its share of index and scratch buffers).
    pub neuron_bytes: Vec<u64>,
    /// Per layer, per neuron: how often it fired in the profile, over `tokens` tokens.
    pub counts: Vec<Vec<u32>>,
    pub tokens: u64,
    /// What the host reads of a neuron left cold, which is what the GPU saves by holding it.
    pub reads: ColdReads,
}

/// What the host reads of a cold neuron per token. Neurons are ranked by it, per GPU byte.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ColdReads {
    /// All of its rows when it fires, nothing otherwise: a perfect predictor.
    WhenFiring,
    /// Its gate row whenever it is a candidate, its up and down rows when it fires too.
    /// `gate_share`: the gate row's share of the neuron's host bytes.
    GateOfCandidates { gate_share: f64, candidates: Candidates },
}

/// Which cold neurons get their gate row read in a token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Candidates {
    /// Every one (`--ffn relu`: the gate decides).
    All,
    /// A predictor's: a firing neuron with probability `recall`, a silent one of firing rate q
    /// with min(1, c q), c such that the named ones fire at `precision` (the error model of
    /// [`crate::sparse::simulate`], and what ember's predictors measured: recall 0.99,
    /// precision 0.3).
    Predicted { recall: f64, precision: f64 },
}

impl ColdReads {
    /// Per layer, per neuron: the share of its host bytes read per token when it is cold.
    fn shares(&self, counts: &[Vec<u32>], tokens: u64) -> Vec<Vec<f64>> {
        let t = tokens.max(1) as f64;
        counts
            .iter()
            .map(|layer| {
                let rates: Vec<f64> = layer.iter().map(|&c| (c as f64 / t).min(1.0)).collect();
                match *self {
                    ColdReads::WhenFiring => rates,
                    ColdReads::GateOfCandidates { gate_share: g, candidates: Candidates::All } => rates.iter().map(|&p| g + (1.0 - g) * p).collect(),
                    ColdReads::GateOfCandidates { gate_share: g, candidates: Candidates::Predicted { recall, precision } } => {
                        let as_f32: Vec<f32> = rates.iter().map(|&p| p as f32).collect();
                        let c = crate::sparse::simulate::false_positive_scale(&as_f32, recall, precision);
                        rates.iter().map(|&p| g * (recall * p + (1.0 - p) * (c * p).min(1.0)) + (1.0 - g) * recall * p).collect()
                    }
                }
            })
            .collect()
    }
}

/// The result: which neurons of each layer are hot (on the GPU), and the bytes spent.
#[derive(Clone, Debug)]
pub struct Placement {
    pub budget: u64,
    pub fixed: Vec<FixedPart>,
    /// Per layer, ascending ids of the neurons placed on the GPU.
    pub hot: Vec<Vec<u32>>,
    pub neuron_bytes: Vec<u64>,
    /// Share of all profiled firings that hot neurons account for, per layer and overall.
    pub covered_per_layer: Vec<f64>,
    pub covered: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("a VRAM budget of {budget} cannot hold what every token needs on the GPU ({need}: {parts}); raise --vram-budget, shrink the KV cache with a smaller --ctx-size, or run on the CPU")]
    TooSmall { budget: Bytes, need: Bytes, parts: String },
    #[error("the activation profile has {got} layers of {widths}, the model {want} layers of {n_ff} neurons; profile this model again (`ember profile`)")]
    ProfileMismatch { got: usize, widths: String, want: usize, n_ff: usize },
    #[error("the given placement puts {need} of FFN neurons on the GPU, but the budget leaves {left} for them; make a new one for this budget (`ember plan -o`), or drop --placement")]
    GivenTooLarge { need: Bytes, left: Bytes },
    #[error("the given placement covers {got} layers, the model has {want}")]
    GivenMismatch { got: usize, want: usize },
}

/// A byte count printed in the unit that reads best.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= (1u64 << 30) as f64 {
            write!(f, "{:.2} GiB", b / (1u64 << 30) as f64)
        } else if b >= (1u64 << 20) as f64 {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        } else if b >= 1024.0 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl Placement {
    /// Bytes placed: fixed parts and hot neurons.
    pub fn used(&self) -> u64 {
        self.fixed_bytes() + self.hot_bytes()
    }

    pub fn fixed_bytes(&self) -> u64 {
        self.fixed.iter().map(|p| p.bytes).sum()
    }

    pub fn hot_bytes(&self) -> u64 {
        self.hot.iter().zip(&self.neuron_bytes).map(|(h, &b)| h.len() as u64 * b).sum()
    }

    pub fn n_hot(&self) -> usize {
        self.hot.iter().map(Vec::len).sum()
    }

    /// Every neuron of every layer is on the GPU: no CPU work, no per-layer synchronisation.
    pub fn all_hot(&self, n_ff: usize) -> bool {
        self.hot.iter().all(|h| h.len() == n_ff)
    }
}

/// Places `input` under `budget` bytes.
pub fn place(input: &PlacementInput, budget: u64, n_ff: usize) -> Result<Placement, PlacementError> {
    let mut left = room_for_neurons(input, budget, n_ff)?;
    let n_layer = input.neuron_bytes.len();
    let shares = input.reads.shares(&input.counts, input.tokens);
    // Every neuron, most host reads saved per GPU byte first; ties by (layer, index) so the
    // plan is the same on every run and machine.
    let mut order: Vec<(f64, u32, u32)> = (0..n_layer).flat_map(|l| (0..n_ff as u32).map(move |i| (l, i))).map(|(l, i)| (shares[l][i as usize] / input.neuron_bytes[l].max(1) as f64, l as u32, i)).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let mut hot = vec![Vec::new(); n_layer];
    for &(_, l, i) in &order {
        let c = input.neuron_bytes[l as usize];
        if c <= left {
            left -= c;
            hot[l as usize].push(i);
        }
    }
    for h in &mut hot {
        h.sort_unstable();
    }
    Ok(finish(input, budget, hot, n_ff))
}

/// Where a layer's attention half runs in a hybrid session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnSite {
    /// All of it on the GPU: norms, q/k/v, o and the KV cache.
    Gpu,
    /// The q/k/v product on the GPU (the weights every token reads whole); the KV cache, the
    /// attention itself and the o product on the host. One exchange a layer, as [`Host`](Self::Host).
    Qkv,
    /// All of it on the host.
    Host,
}

impl AttnSite {
    /// Sites from per-layer flags: true = [`Gpu`](Self::Gpu), false = [`Host`](Self::Host).
    pub fn from_flags(on_gpu: &[bool]) -> Vec<AttnSite> {
        on_gpu.iter().map(|&g| if g { AttnSite::Gpu } else { AttnSite::Host }).collect()
    }
}

/// One layer's attention as two candidates for the GPU: its q/k/v weights (read whole by the
/// host every token when they stay there), and the rest, the o weights and the KV cache for
/// the whole context with the ops' buffers, of which the host reads `rest_read_share` per
/// token (o whole, on average half the cache). The rest goes to the GPU only with the q/k/v.
#[derive(Clone, Copy, Debug)]
pub struct AttentionCost {
    pub qkv_bytes: u64,
    pub rest_bytes: u64,
    pub rest_read_share: f64,
}

/// [`place`] where each layer's attention and KV cache may also stay on the host (CPU
/// attention): `input.fixed` then leaves the layers' attention out, and the attention blocks
/// compete with the neurons for the budget. Both are ranked by the share of their bytes the
/// host would read per token, per GPU byte they take: a neuron by [`ColdReads`], an attention
/// block by its read share (the q/k/v block at 1: it goes before any neuron read less than
/// whole every token). Returns the placement and each layer's [`AttnSite`].
pub fn place_with_attention(input: &PlacementInput, attention: &[AttentionCost], budget: u64, n_ff: usize) -> Result<(Placement, Vec<AttnSite>), PlacementError> {
    let mut left = room_for_neurons(input, budget, n_ff)?;
    let n_layer = input.neuron_bytes.len();
    if attention.len() != n_layer {
        return Err(PlacementError::GivenMismatch { got: attention.len(), want: n_layer });
    }
    // Items: (key, layer, neuron id, or QKV / REST for the attention blocks). Keys in shares
    // read per byte, as `place` ranks neurons; ties by (layer, id), attention first.
    const QKV: u32 = u32::MAX - 1;
    const REST: u32 = u32::MAX;
    let shares = input.reads.shares(&input.counts, input.tokens);
    let mut items: Vec<(f64, u32, u32)> = Vec::with_capacity(n_layer * (n_ff + 2));
    for (l, att) in attention.iter().enumerate().take(n_layer) {
        let nb = input.neuron_bytes[l].max(1) as f64;
        items.push((1.0 / nb, l as u32, QKV));
        items.push((att.rest_read_share.clamp(0.0, 1.0) / nb, l as u32, REST));
        items.extend((0..n_ff as u32).map(|i| (shares[l][i as usize] / nb, l as u32, i)));
    }
    let rank = |i: u32| if i >= QKV { (0u8, i) } else { (1u8, i) };
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, rank(a.2)).cmp(&(b.1, rank(b.2)))));
    let mut hot = vec![Vec::new(); n_layer];
    let mut sites = vec![AttnSite::Host; n_layer];
    for &(_, l, i) in &items {
        let l = l as usize;
        let c = match i {
            QKV => attention[l].qkv_bytes,
            // The rest only after the layer's q/k/v.
            REST if sites[l] != AttnSite::Qkv => continue,
            REST => attention[l].rest_bytes,
            _ => input.neuron_bytes[l],
        };
        if c <= left {
            left -= c;
            match i {
                QKV => sites[l] = AttnSite::Qkv,
                REST => sites[l] = AttnSite::Gpu,
                _ => hot[l].push(i),
            }
        }
    }
    for h in &mut hot {
        h.sort_unstable();
    }
    let mut input = input.clone();
    let attn_bytes: u64 = attention
        .iter()
        .zip(&sites)
        .map(|(a, s)| match s {
            AttnSite::Gpu => a.qkv_bytes + a.rest_bytes,
            AttnSite::Qkv => a.qkv_bytes,
            AttnSite::Host => 0,
        })
        .sum();
    let n_gpu = sites.iter().filter(|&&s| s == AttnSite::Gpu).count();
    let n_qkv = sites.iter().filter(|&&s| s == AttnSite::Qkv).count();
    input.fixed.push(FixedPart { name: format!("attention and KV cache of {n_gpu} of {n_layer} layers, q/k/v of {n_qkv} more"), bytes: attn_bytes });
    Ok((finish(&input, budget, hot, n_ff), sites))
}

/// A placement made earlier (`ember plan -o`, a PowerInfer split file, or ember's cache beside
/// the model), checked to fit `budget` after the fixed parts measured now. `hot` holds per
/// layer ascending neuron ids below `n_ff`.
pub fn given(input: &PlacementInput, budget: u64, n_ff: usize, hot: Vec<Vec<u32>>) -> Result<Placement, PlacementError> {
    let left = room_for_neurons(input, budget, n_ff)?;
    if hot.len() != input.neuron_bytes.len() {
        return Err(PlacementError::GivenMismatch { got: hot.len(), want: input.neuron_bytes.len() });
    }
    let need: u64 = hot.iter().zip(&input.neuron_bytes).map(|(h, &b)| h.len() as u64 * b).sum();
    if need > left {
        return Err(PlacementError::GivenTooLarge { need: Bytes(need), left: Bytes(left) });
    }
    Ok(finish(input, budget, hot, n_ff))
}

/// Bytes the budget leaves for FFN neurons after the fixed parts; checks the profile's shape.
fn room_for_neurons(input: &PlacementInput, budget: u64, n_ff: usize) -> Result<u64, PlacementError> {
    let n_layer = input.neuron_bytes.len();
    if input.counts.len() != n_layer || input.counts.iter().any(|c| c.len() != n_ff) {
        let widths: Vec<usize> = input.counts.iter().map(Vec::len).collect();
        let mut w = widths.clone();
        w.dedup();
        return Err(PlacementError::ProfileMismatch { got: input.counts.len(), widths: format!("{w:?} neurons"), want: n_layer, n_ff });
    }
    let fixed_bytes: u64 = input.fixed.iter().map(|p| p.bytes).sum();
    if fixed_bytes > budget {
        let parts = input.fixed.iter().map(|p| format!("{} {}", p.name, Bytes(p.bytes))).collect::<Vec<_>>().join(", ");
        return Err(PlacementError::TooSmall { budget: Bytes(budget), need: Bytes(fixed_bytes), parts });
    }
    Ok(budget - fixed_bytes)
}

/// The placement of `hot`, with the shares of profiled firings it covers.
fn finish(input: &PlacementInput, budget: u64, hot: Vec<Vec<u32>>, n_ff: usize) -> Placement {
    let covered_per_layer: Vec<f64> = hot
        .iter()
        .zip(&input.counts)
        .map(|(h, c)| {
            let total: u64 = c.iter().map(|&v| v as u64).sum();
            let on: u64 = h.iter().map(|&i| c[i as usize] as u64).sum();
            if total == 0 { if h.len() == n_ff { 1.0 } else { 0.0 } } else { on as f64 / total as f64 }
        })
        .collect();
    let total: u64 = input.counts.iter().flatten().map(|&v| v as u64).sum();
    let on: u64 = hot.iter().zip(&input.counts).map(|(h, c)| h.iter().map(|&i| c[i as usize] as u64).sum::<u64>()).sum();
    let covered = if total == 0 { 0.0 } else { on as f64 / total as f64 };
    Placement { budget, fixed: input.fixed.clone(), hot, neuron_bytes: input.neuron_bytes.clone(), covered_per_layer, covered }
}

/// A fingerprint of firing counts (FNV-1a over the layers' shapes and values): a cached
/// placement is reused only for the profile it was made from.
pub fn counts_fingerprint(counts: &[Vec<u32>]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u32| {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    for layer in counts {
        eat(layer.len() as u32);
        for &c in layer {
            eat(c);
        }
    }
    h
}

/// Parses a budget in GiB ("4", "0.05", "1.5GiB", "512MiB").
pub fn parse_budget(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, scale) = if let Some(n) = lower.strip_suffix("gib").or_else(|| lower.strip_suffix("g")) {
        (n, (1u64 << 30) as f64)
    } else if let Some(n) = lower.strip_suffix("mib").or_else(|| lower.strip_suffix("m")) {
        (n, (1u64 << 20) as f64)
    } else {
        (lower.as_str(), (1u64 << 30) as f64)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("--vram-budget {t:?}: expected GiB as a number, e.g. 4 or 0.05 (or 512MiB)"))?;
    if !(v.is_finite() && v > 0.0 && v * scale < (1u64 << 50) as f64) {
        return Err(format!("--vram-budget {t:?}: must be a positive size below 1 PiB"));
    }
    Ok((v * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_top_k_across_layers() {
        let input = PlacementInput {
            fixed: vec![FixedPart { name: "attention".into(), bytes: 100 }],
            neuron_bytes: vec![10, 10],
            counts: vec![vec![5, 1, 9, 0], vec![7, 7, 2, 8]],
            tokens: 10,
            reads: ColdReads::WhenFiring,
        };
        // 100 fixed + 4 neurons of 10 bytes.
        let p = place(&input, 145, 4).unwrap();
        assert_eq!(p.hot, vec![vec![2], vec![0, 1, 3]]);
        assert_eq!(p.used(), 140);
        let total = 5 + 1 + 9 + 7 + 7 + 2 + 8;
        assert!((p.covered - (9 + 7 + 7 + 8) as f64 / total as f64).abs() < 1e-12);
        assert!(matches!(place(&input, 99, 4), Err(PlacementError::TooSmall { .. })));
        assert!(matches!(place(&input, 100, 5), Err(PlacementError::ProfileMismatch { .. })));
        // Given back, the same placement fits the same budget and no smaller one.
        let again = given(&input, 145, 4, p.hot.clone()).unwrap();
        assert_eq!((again.hot, again.covered), (p.hot.clone(), p.covered));
        assert!(matches!(given(&input, 139, 4, p.hot.clone()), Err(PlacementError::GivenTooLarge { .. })));
        assert!(matches!(given(&input, 145, 4, vec![vec![0]]), Err(PlacementError::GivenMismatch { .. })));
        assert_ne!(counts_fingerprint(&input.counts), counts_fingerprint(&[vec![5, 1, 9, 0], vec![7, 7, 2, 9]]));
    }

    #[test]
    fn attention_competes_with_neurons_by_rate() {
        use AttnSite::*;
        // Two layers of 4 neurons of 10 bytes, fired over 10 tokens; attention blocks of 10
        // bytes of q/k/v (read every token, like a neuron firing 10 times in 10) and 20 of
        // the rest, read at 0.75 per token (like a neuron firing 7.5 times in 10).
        let input = PlacementInput { fixed: vec![FixedPart { name: "embeddings".into(), bytes: 100 }], neuron_bytes: vec![10, 10], counts: vec![vec![9, 1, 8, 0], vec![7, 7, 2, 10]], tokens: 10, reads: ColdReads::WhenFiring };
        let attn = [AttentionCost { qkv_bytes: 10, rest_bytes: 20, rest_read_share: 0.75 }; 2];
        // 100 fixed + 90: layer 0's q/k/v, layer 1's q/k/v, neuron 10 (l1 n3), 9 (l0 n0), 8
        // (l0 n2), then layer 0's rest (20 of 40 left), then layer 1's (20 left), nothing more.
        let (p, sites) = place_with_attention(&input, &attn, 190, 4).unwrap();
        assert_eq!(sites, vec![Gpu, Gpu]);
        assert_eq!(p.hot, vec![vec![0, 2], vec![3]]);
        assert_eq!(p.used(), 100 + 60 + 30);
        // 10 less: layer 1's rest no longer fits; a neuron firing 7 times takes half its room.
        let (p, sites) = place_with_attention(&input, &attn, 180, 4).unwrap();
        assert_eq!(sites, vec![Gpu, Qkv]);
        assert_eq!(p.hot, vec![vec![0, 2], vec![0, 3]]);
        assert_eq!(p.used(), 100 + 40 + 40);
        // A rest never read goes last; one read whole every token ranks with its q/k/v.
        let never = [AttentionCost { qkv_bytes: 10, rest_bytes: 20, rest_read_share: 0.0 }; 2];
        let (p, sites) = place_with_attention(&input, &never, 160, 4).unwrap();
        assert_eq!((sites, p.n_hot()), (vec![Qkv, Qkv], 4));
        let whole = [AttentionCost { qkv_bytes: 10, rest_bytes: 20, rest_read_share: 1.0 }; 2];
        let (p, sites) = place_with_attention(&input, &whole, 160, 4).unwrap();
        assert_eq!((sites, p.n_hot()), (vec![Gpu, Gpu], 0));
        // The rest never goes without its q/k/v: q/k/v too large for the room left.
        let big_qkv = [AttentionCost { qkv_bytes: 70, rest_bytes: 5, rest_read_share: 1.0 }; 2];
        let (_, sites) = place_with_attention(&input, &big_qkv, 160, 4).unwrap();
        assert_eq!(sites, vec![Host, Host]);
        assert!(place_with_attention(&input, &attn[..1], 180, 4).is_err());
        assert_eq!(AttnSite::from_flags(&[true, false]), vec![Gpu, Host]);
    }

    #[test]
    fn gate_reads_raise_every_neuron_against_the_attention() {
        use AttnSite::*;
        // Layer 0's neurons fire at 0.4 and 0.1, layer 1's at 0.3 and 0; the rest of an
        // attention block is read at 0.45 per token; everything takes 10 bytes of 50. Ranked
        // by firing alone, both rests go before every neuron; when the host reads the gate row
        // (a third of a neuron) of every cold neuron (`--ffn relu`), the neurons firing at 0.4
        // and 0.3 are read at 0.6 and 0.53 per token and go first, leaving room for one rest.
        let mut input = PlacementInput { fixed: vec![], neuron_bytes: vec![10, 10], counts: vec![vec![4, 1], vec![3, 0]], tokens: 10, reads: ColdReads::WhenFiring };
        let attn = [AttentionCost { qkv_bytes: 10, rest_bytes: 10, rest_read_share: 0.45 }; 2];
        let (p, sites) = place_with_attention(&input, &attn, 50, 2).unwrap();
        assert_eq!((sites, p.hot), (vec![Gpu, Gpu], vec![vec![0], vec![]]));
        input.reads = ColdReads::GateOfCandidates { gate_share: 1.0 / 3.0, candidates: Candidates::All };
        let (p, sites) = place_with_attention(&input, &attn, 50, 2).unwrap();
        assert_eq!((sites, p.hot), (vec![Gpu, Qkv], vec![vec![0], vec![0]]));
        // A predictor that names few silent neurons (precision 0.9) reads little more than
        // the firing ones: the rests go first again.
        input.reads = ColdReads::GateOfCandidates { gate_share: 1.0 / 3.0, candidates: Candidates::Predicted { recall: 1.0, precision: 0.9 } };
        let (_, sites) = place_with_attention(&input, &attn, 50, 2).unwrap();
        assert_eq!(sites, vec![Gpu, Gpu]);
        // Shares: the firing rate for a perfect predictor; every gate row for relu; at precision
        // 0.3 a neuron firing at 0.4 is always named (c * 0.4 >= 1), so read at 1/3 + 2/3 * 0.4.
        let shares = |reads: ColdReads| reads.shares(&[vec![4, 1]], 10).remove(0);
        assert_eq!(shares(ColdReads::WhenFiring), vec![0.4, 0.1]);
        let all = shares(ColdReads::GateOfCandidates { gate_share: 0.25, candidates: Candidates::All });
        assert!((all[0] - (0.25 + 0.75 * 0.4)).abs() < 1e-12 && (all[1] - (0.25 + 0.75 * 0.1)).abs() < 1e-12, "{all:?}");
        let pred = shares(ColdReads::GateOfCandidates { gate_share: 1.0 / 3.0, candidates: Candidates::Predicted { recall: 1.0, precision: 0.3 } });
        assert!((pred[0] - (1.0 / 3.0 + 2.0 / 3.0 * 0.4)).abs() < 1e-9, "{pred:?}");
        assert!(pred[1] > 0.1 && pred[1] < pred[0], "{pred:?}");
    }

    #[test]
    fn budgets_parse() {
        assert_eq!(parse_budget("1").unwrap(), 1 << 30);
        assert_eq!(parse_budget("0.5").unwrap(), 1 << 29);
        assert_eq!(parse_budget("512MiB").unwrap(), 512 << 20);
        assert!(parse_budget("-1").is_err());
        assert!(parse_budget("lots").is_err());
        assert!(parse_budget("nan").is_err());
    }
}
