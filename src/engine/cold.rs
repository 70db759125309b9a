//! The hybrid executor's CPU half: one layer's active cold neurons for one token, computed by a
//! [`Team`] of spinning threads.
//!
//! The numbers are those of [`SparseFfn::token_with`] with the same owned neurons, up to the
//! order of the final sum: the active list is cut into chunks whose length depends on the list
//! length alone ([`team_chunk_len`]), each chunk sums its neurons in list order into its own
//! buffer, and the buffers are added in chunk order. Which member computes which chunk does
//! not matter, so the result is the same run after run and for any team size.

use super::ffn::{retain_sorted_intersection, FfnMode, SparseFfn};
use crate::cpu::matmul::{Activations, Precision};
use crate::cpu::sparse::{gated_ffn_chunks, matvec_rows};
use crate::cpu::team::Team;
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

/// A team and the buffers it reuses token after token.
pub struct ColdFfn {
    team: Team,
    gate: Vec<f32>,
    active: Vec<u32>,
    partials: Vec<f32>,
}

impl ColdFfn {
    /// A team of `threads` members (the calling thread is one of them).
    pub fn new(threads: usize) -> ColdFfn {
        ColdFfn { team: Team::new(threads), gate: Vec::new(), active: Vec::new(), partials: Vec::new() }
    }

    pub fn threads(&self) -> usize {
        self.team.size()
    }

    /// The FFN output of layer `il`'s active neurons among `cold` (ascending), written to `out`
    /// (n_embd values): `resid` is the residual stream entering the block (the predictor's
    /// input), `xn` its normalised form. In predict mode `given` replaces the predictor's set
    /// (simulated activity). Returns how many neurons were computed.
    #[allow(clippy::too_many_arguments)]
    pub fn token(&mut self, ffn: &SparseFfn, model: &Model, il: usize, resid: &[f32], xn: &[f32], cold: &[u32], given: Option<&[u32]>, precision: Precision, out: &mut [f32]) -> usize {
        let layer = &model.layers[il];
        let act = model.hp.activation;
        let acts = Activations::new(xn, 1).with_precision(precision);
        let ColdFfn { team, gate, active, partials } = self;
        active.clear();
        let gate_given = match ffn.mode {
            FfnMode::Predict => {
                match given {
                    Some(set) => active.extend_from_slice(set),
                    None => ffn.predictors.as_ref().expect("predict mode has predictors").layers[il].active(resid, active),
                }
                retain_sorted_intersection(active, cold);
                None
            }
            FfnMode::Relu | FfnMode::Dense | FfnMode::Threshold => {
                gate.resize(model.hp.n_ff, 0.0);
                matvec_rows(&layer.ffn_gate, &acts, cold, gate);
                active.extend(cold.iter().copied().filter(|&i| ffn.keeps(il, act, gate[i as usize])));
                Some(gate.as_slice())
            }
        };
        let cols = out.len();
        if active.is_empty() {
            out.fill(0.0);
            return 0;
        }
        let active: &[u32] = active;
        gated_ffn_chunks(&layer.ffn_gate, &layer.ffn_up, &ffn.down_t[il], &acts, act, gate_given, active, |sum_chunk| {
            let chunk_len = team_chunk_len(active.len());
            let n_chunks = active.len().div_ceil(chunk_len);
            partials.resize(n_chunks * cols, 0.0);
            {
                let slots: Vec<Mutex<&mut [f32]>> = partials.chunks_mut(cols).map(Mutex::new).collect();
                let next = AtomicUsize::new(0);
                team.run(&|_, _| loop {
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    if c >= n_chunks {
                        break;
                    }
                    let mut acc = slots[c].lock().unwrap();
                    acc.fill(0.0);
                    let start = c * chunk_len;
                    sum_chunk(start, chunk_len.min(active.len() - start), &mut acc);
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
        active.len()
    }
}
