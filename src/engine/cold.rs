//! The hybrid executor's CPU half: one layer's active cold neurons for one token, computed by a
//! [`Team`] of spinning threads.
//!
//! The numbers are those of [`SparseFfn::token_with`] with the same owned neurons, up to the
//! order of the final sum: the active list is cut into chunks whose length depends on the list
//! length alone ([`team_chunk_len`]), each chunk sums its neurons in list order into its own
//! buffer, and the buffers are added in chunk order. Which member computes which chunk does
//! not matter, so the result is the same run after run and for any team size.

use super::ffn::{retain_sorted_intersection, FfnMode, SparseFfn};
use crate::cpu::matmul::{matmul_packed_beside, matmul_packed_first, matmuls_tuned, Activations, CpuTuning, Precision};
use crate::model::Matrix;
use crate::quant::packed::{packs, Isa, PackedMatrix};
use crate::cpu::sparse::{gated_ffn_chunks, matvec_rows, row_dots_serial};
use crate::sparse::predictor::Predictor;
use crate::cpu::team::{Aside, Team};
use crate::model::Model;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Output columns per reduction task.
const REDUCE_COLS: usize = 256;

/// Neurons per chunk for a list of `n`: short enough that a 7B layer's ~800 active cold
/// neurons make ~50 chunks to balance 16 threads, long enough that a chunk's partial sum
/// (one n_embd buffer to zero and add) stays small next to its rows.
pub fn team_chunk_len(n: usize) -> usize {
    n.div_ceil(48).max(16)
}

/// A layer's cold neurons: their ids (ascending) and, where this CPU has packed kernels for
/// the gate's type, a dense packed copy of their gate rows.
///
/// A charged predictor at recall 0.99 and precision 0.3 names about three candidates per
/// firing neuron, so at a 24% firing rate most cold neurons' gate rows are read every token;
/// gathered row by row they ran at about 40% of a dense packed product's rate (16 KiB
/// prefetch streams restarting at every gap, four rows per pass instead of sixteen). Past
/// [`ColdRows::DENSE_SHARE`] of the cold neurons, all their gate rows are multiplied densely
/// and the listed ones' values taken: more bytes, less time, and the same values (the packed
/// kernels' dots are the row kernels', bit for bit).
pub struct ColdRows {
    pub ids: Vec<u32>,
    gate: Option<PackedMatrix>,
}

impl ColdRows {
    /// The share of a layer's cold neurons listed for a token from which their gate rows are
    /// multiplied densely.
    pub const DENSE_SHARE: f64 = 0.4;

    /// `ids` (ascending) of `gate`'s rows; the packed copy is made where this CPU and the
    /// type have packed kernels (the rows are gathered once, here).
    pub fn new(gate: &Matrix, ids: Vec<u32>) -> ColdRows {
        let dense = Isa::detect().is_some() && packs(gate.ty) && !ids.is_empty();
        let gate = dense.then(|| {
            let rb = gate.row_bytes();
            let mut bytes = Vec::with_capacity(ids.len() * rb);
            for &i in &ids {
                bytes.extend_from_slice(&gate.bytes()[i as usize * rb..][..rb]);
            }
            PackedMatrix::new(gate.ty, ids.len(), gate.cols, &bytes).expect("whole rows of the gate's type")
        });
        ColdRows { ids, gate }
    }

    /// The ids alone, with no packed copy (every gate row gathered).
    pub fn gathered(ids: Vec<u32>) -> ColdRows {
        ColdRows { ids, gate: None }
    }

    /// Host bytes of the packed copy.
    pub fn packed_bytes(&self) -> u64 {
        self.gate.as_ref().map_or(0, |p| p.n_bytes() as u64)
    }

    /// The packed gate, where a token listing `listed` of these neurons at `precision` should
    /// use it.
    fn dense_gate(&self, listed: usize, precision: Precision) -> Option<&PackedMatrix> {
        let worth = listed as f64 >= Self::DENSE_SHARE * self.ids.len() as f64;
        self.gate.as_ref().filter(|_| worth && precision == Precision::Llama)
    }
}

/// Every cold neuron's gate value into `gate` (n_ff values, indexed by neuron), densely:
/// `dense` holds these neurons' gate rows packed, `scratch` takes their values in list order.
/// `beside` (a matrix, its activations and output: a charged predictor's fc2) is split into
/// the same parts of the same team run; `aside` runs first, on the caller.
#[allow(clippy::too_many_arguments)]
fn dense_gate_values(team: &mut Team, tuning: &CpuTuning, dense: &PackedMatrix, acts: &Activations, ids: &[u32], scratch: &mut Vec<f32>, gate: &mut [f32], beside: Option<(&Matrix, &Activations, &mut [f32])>, aside: &Aside) {
    scratch.resize(ids.len(), 0.0);
    let first = || aside.run();
    match beside {
        Some((w, x2, out2)) => matmul_packed_beside(team, tuning, dense, acts, scratch, w, x2, out2, Some(&first)),
        None => matmul_packed_first(team, tuning, dense, acts, scratch, Some(&first)),
    }
    for (&i, &g) in ids.iter().zip(scratch.iter()) {
        gate[i as usize] = g;
    }
}

/// A team and the buffers it reuses token after token.
pub struct ColdFfn {
    team: Team,
    gate: Vec<f32>,
    active: Vec<u32>,
    fires: Vec<bool>,
    partials: Vec<f32>,
    /// The dense cold gate's values in list order.
    dense: Vec<f32>,
    /// A charged predictor's hidden units and cold logits (by list position).
    hidden: Vec<f32>,
    logits: Vec<f32>,
    /// How the team splits its products (the hybrid's: parts taken from a counter, so that a
    /// member the OS preempts, beside the command recorder and the driver's threads, delays a
    /// step by one part instead of its whole share).
    pub tuning: CpuTuning,
    /// Predictor rows computed (for tests: the charged work really runs), and the seconds.
    pub predictor_rows: u64,
    pub predictor_secs: f64,
}

/// `vals[k] = w row rows[k] · acts`, the list cut into runs that the members take from a
/// shared counter (`tuning.parts_per_member` per member; 0: one contiguous run each).
fn team_row_dots(team: &mut Team, tuning: &CpuTuning, w: &crate::model::Matrix, acts: &Activations, rows: &[u32], vals: &mut [f32], aside: &Aside) {
    let parts = team.size() * tuning.parts_per_member.max(1);
    let per = rows.len().div_ceil(parts).max(1);
    let slots: Vec<Mutex<&mut [f32]>> = vals.chunks_mut(per).map(Mutex::new).collect();
    let next = AtomicUsize::new(0);
    team.run(&|member, _| {
        if member == 0 {
            aside.run();
        }
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = slots.get(k) else { break };
            let mut v = slot.lock().unwrap();
            let len = v.len();
            row_dots_serial(w, acts, &rows[k * per..k * per + len], &mut v);
        }
    });
}

impl ColdFfn {
    /// A team of `threads` members (the calling thread is one of them).
    pub fn new(threads: usize) -> ColdFfn {
        ColdFfn { team: Team::new(threads), gate: Vec::new(), active: Vec::new(), fires: Vec::new(), partials: Vec::new(), dense: Vec::new(), tuning: CpuTuning::default(), hidden: Vec::new(), logits: Vec::new(), predictor_rows: 0, predictor_secs: 0.0 }
    }

    /// The same with products split as `tuning` says.
    pub fn with_tuning(mut self, tuning: CpuTuning) -> ColdFfn {
        self.tuning = tuning;
        self
    }

    pub fn threads(&self) -> usize {
        self.team.size()
    }

    /// The team, for other CPU work of the hybrid between cold neurons (host attention).
    pub fn team(&mut self) -> &mut Team {
        &mut self.team
    }

    /// The FFN output of layer `il`'s active neurons among `cold` (ascending), written to `out`
    /// (n_embd values): `resid` is the residual stream entering the block (the predictor's
    /// input), `xn` its normalised form. In predict mode `given` replaces the predictor's set
    /// (simulated activity). `aside` runs once, on the first member to reach it as the team's
    /// first product starts (or before returning, if there is none). Returns how many neurons
    /// were computed.
    #[allow(clippy::too_many_arguments)]
    pub fn token(&mut self, ffn: &SparseFfn, model: &Model, il: usize, resid: &[f32], xn: &[f32], cold: &ColdRows, given: Option<&[u32]>, precision: Precision, out: &mut [f32], aside: &Aside) -> usize {
        let layer = &model.layers[il];
        let act = model.hp.activation;
        let acts = Activations::new(xn, 1).with_precision(precision);
        let ColdFfn { team, gate, active, partials, dense, tuning, .. } = self;
        active.clear();
        let gate_given = match ffn.mode {
            FfnMode::Predict => {
                match given {
                    Some(set) => active.extend_from_slice(set),
                    None => ffn.predictors.as_ref().expect("predict mode has predictors").layers[il].active(resid, active),
                }
                retain_sorted_intersection(active, &cold.ids);
                match cold.dense_gate(active.len(), precision) {
                    Some(p) => {
                        gate.resize(model.hp.n_ff, 0.0);
                        dense_gate_values(team, tuning, p, &acts, &cold.ids, dense, gate, None, aside);
                        Some(gate.as_slice())
                    }
                    None => None,
                }
            }
            FfnMode::Relu | FfnMode::Dense | FfnMode::Threshold => {
                gate.resize(model.hp.n_ff, 0.0);
                match cold.dense_gate(cold.ids.len(), precision) {
                    Some(p) => dense_gate_values(team, tuning, p, &acts, &cold.ids, dense, gate, None, aside),
                    None => matvec_rows(&layer.ffn_gate, &acts, &cold.ids, gate),
                }
                active.extend(cold.ids.iter().copied().filter(|&i| ffn.keeps(il, act, gate[i as usize])));
                Some(gate.as_slice())
            }
        };
        if active.is_empty() {
            aside.run();
            out.fill(0.0);
            return 0;
        }
        ffn_on_team(team, partials, ffn, model, il, &acts, gate_given, active, None, out, aside);
        active.len()
    }

    /// Layer `il`'s FFN output over the neurons `cold` (ascending) for each of the `n` tokens
    /// of `xn` (n x n_embd, normalised inputs) into `out` (n x n_embd), densely: every cold
    /// neuron's gate row, then up and down rows for those whose activation is not zero (ReLU:
    /// gate > 0; SiLU: all). What a prefill batch computes whatever the FFN mode (the union of
    /// a batch's firing neurons is nearly all of them, and a predictor is not consulted); for
    /// `--ffn relu` the numbers of [`Self::token`], token by token. Returns the neurons
    /// computed past their gate row, summed over the tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_dense(&mut self, ffn: &SparseFfn, model: &Model, il: usize, xn: &[f32], cold: &[u32], precision: Precision, out: &mut [f32]) -> usize {
        let layer = &model.layers[il];
        let act = model.hp.activation;
        let e = model.hp.n_embd;
        let n = xn.len() / e;
        let ColdFfn { team, gate, active, partials, logits: vals, tuning, .. } = self;
        gate.resize(model.hp.n_ff, 0.0);
        vals.resize(cold.len(), 0.0);
        let mut computed = 0;
        for t in 0..n {
            let acts = Activations::new(&xn[t * e..(t + 1) * e], 1).with_precision(precision);
            let out_t = &mut out[t * e..(t + 1) * e];
            team_row_dots(team, tuning, &layer.ffn_gate, &acts, cold, vals, &Aside::none());
            active.clear();
            for (&i, &g) in cold.iter().zip(vals.iter()) {
                gate[i as usize] = g;
                // A ReLU gate (ReLU or dReLU) that is not positive makes the neuron silent.
                if !act.gate_is_relu() || g > 0.0 {
                    active.push(i);
                }
            }
            if active.is_empty() {
                out_t.fill(0.0);
                continue;
            }
            ffn_on_team(team, partials, ffn, model, il, &acts, Some(gate), active, None, out_t, &Aside::none());
            computed += active.len();
        }
        computed
    }

    /// A simulated predictor's token for layer `il`'s cold neurons: the predictor runs first
    /// (`predictor`: fc1 on the residual `resid`, its ReLU, and the fc2 rows of every cold
    /// neuron, split over the team; the logits are then set aside, since the draw decides),
    /// then every cold candidate among `candidates` (ascending, with `fires` per candidate)
    /// gets its gate row, and those that fire their up and down rows. `aside` runs as in
    /// [`Self::token`]. Returns how many candidates were cold.
    #[allow(clippy::too_many_arguments)]
    pub fn token_charged(&mut self, ffn: &SparseFfn, model: &Model, il: usize, resid: &[f32], xn: &[f32], cold_rows: &ColdRows, candidates: &[u32], fires: &[bool], predictor: Option<&Predictor>, precision: Precision, out: &mut [f32], aside: &Aside) -> usize {
        let ColdFfn { team, gate, active, fires: cold_fires, partials, dense, tuning, hidden, logits, predictor_rows, predictor_secs, .. } = self;
        let cold = cold_rows.ids.as_slice();
        // The candidates that are cold (both lists ascending).
        active.clear();
        cold_fires.clear();
        let mut j = 0;
        for (&c, &f) in candidates.iter().zip(fires) {
            while j < cold.len() && cold[j] < c {
                j += 1;
            }
            if j < cold.len() && cold[j] == c {
                active.push(c);
                cold_fires.push(f);
            }
        }
        let n_candidates = active.len();
        let dense_gate = (n_candidates > 0).then(|| cold_rows.dense_gate(n_candidates, precision)).flatten();
        // The predictor's charge: beside the dense gate product (which needs no candidates, see
        // below) the caller's; otherwise two products of the team's over the cold rows.
        if let (Some(p), None) = (predictor, dense_gate) {
            let t = std::time::Instant::now();
            let rank = p.fc1.rows;
            hidden.resize(rank, 0.0);
            matmuls_tuned(team, tuning, &Activations::new(resid, 1).with_precision(precision), [(&p.fc1, &mut hidden[..])]);
            for h in hidden.iter_mut() {
                *h = h.max(0.0);
            }
            logits.resize(cold.len(), 0.0);
            team_row_dots(team, tuning, &p.fc2, &Activations::new(hidden, 1).with_precision(precision), cold, logits, aside);
            std::hint::black_box(&logits);
            *predictor_secs += t.elapsed().as_secs_f64();
        }
        if let Some(p) = predictor {
            *predictor_rows += (p.fc1.rows + if dense_gate.is_some() { p.n_ff() } else { cold.len() }) as u64;
        }
        if active.is_empty() {
            aside.run();
            out.fill(0.0);
            return 0;
        }
        let acts = Activations::new(xn, 1).with_precision(precision);
        let gate_given = match dense_gate {
            Some(packed) => {
                gate.resize(model.hp.n_ff, 0.0);
                // The predictor as the CPU's predict mode computes it for every neuron: fc1 on
                // this thread (a tenth of its bytes), then fc2's rows split into the same parts
                // as the dense gate product. (Run alone by the caller beside the product, it
                // took 5.2 of 13.9 ms a token on the H100 host, session 13.) The logits are set
                // aside, since the draw decides. Only fc1 is timed: fc2's rows are inside the
                // product's parts.
                let h = predictor.map(|p| {
                    let t = std::time::Instant::now();
                    hidden.clear();
                    hidden.extend(p.hidden(resid));
                    *predictor_secs += t.elapsed().as_secs_f64();
                    logits.resize(p.n_ff(), 0.0);
                    (p, Activations::new(hidden, 1).with_precision(precision))
                });
                let beside = h.as_ref().map(|(p, h)| (&p.fc2, h, &mut logits[..]));
                dense_gate_values(team, tuning, packed, &acts, cold, dense, gate, beside, aside);
                std::hint::black_box(&logits);
                Some(gate.as_slice())
            }
            None => None,
        };
        ffn_on_team(team, partials, ffn, model, il, &acts, gate_given, active, Some(cold_fires), out, aside);
        n_candidates
    }
}

/// Layer `il`'s FFN output of the neurons `active` (ascending; with `fires`, only the flagged
/// ones past their gate row) into `out`, by chunks on the team, partial sums added in chunk
/// order.
#[allow(clippy::too_many_arguments)]
fn ffn_on_team(team: &mut Team, partials: &mut Vec<f32>, ffn: &SparseFfn, model: &Model, il: usize, acts: &Activations, gate_given: Option<&[f32]>, active: &[u32], fires: Option<&[bool]>, out: &mut [f32], aside: &Aside) {
    let layer = &model.layers[il];
    let act = model.hp.activation;
    let cols = out.len();
    gated_ffn_chunks(&layer.ffn_gate, &layer.ffn_up, &ffn.down_t[il], acts, act, gate_given, active, fires, |sum_chunk| {
        let chunk_len = team_chunk_len(active.len());
        let n_chunks = active.len().div_ceil(chunk_len);
        partials.resize(n_chunks * cols, 0.0);
        {
            let slots: Vec<Mutex<&mut [f32]>> = partials.chunks_mut(cols).map(Mutex::new).collect();
            let next = AtomicUsize::new(0);
            team.run(&|member, _| {
                if member == 0 {
                    aside.run();
                }
                loop {
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    if c >= n_chunks {
                        break;
                    }
                    let mut acc = slots[c].lock().unwrap();
                    acc.fill(0.0);
                    let start = c * chunk_len;
                    sum_chunk(start, chunk_len.min(active.len() - start), &mut acc);
                }
            });
        }
        // Partial sums added in chunk order, element by element, columns split over members.
        let partials: &[f32] = partials;
        let blocks: Vec<Mutex<&mut [f32]>> = out.chunks_mut(REDUCE_COLS).map(Mutex::new).collect();
        let next = AtomicUsize::new(0);
        team.run(&|_, _| loop {
            let b = next.fetch_add(1, Ordering::Relaxed);
            if b >= blocks.len() {
                break;
            }
            let mut o = blocks[b].lock().unwrap();
            let (start, len) = (b * REDUCE_COLS, o.len());
            o.copy_from_slice(&partials[start..start + len]);
            for c in 1..n_chunks {
                let p = &partials[c * cols + start..c * cols + start + len];
                for (a, &v) in o.iter_mut().zip(p) {
                    *a += v;
                }
            }
        });
    });
}
