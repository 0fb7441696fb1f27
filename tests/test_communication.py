"""The bytes a training step sends per process, from the shapes (lmforge.train.communication)."""

from __future__ import annotations

from dataclasses import replace

from lmforge.model.decoder import ModelConfig
from lmforge.train.communication import Layout, step_bytes, unit_elements

CONFIG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
FSDP2 = Layout(dp=2, micro_batch_size=4, seq_len=16)


def test_the_units_hold_every_parameter_once():
    blocks, root = unit_elements(CONFIG, tp=1)
    assert sum(blocks) + root == CONFIG.num_params()


def test_bf16_reduction_halves_the_reduce_scatter_and_nothing_else():
    fp32, bf16 = step_bytes(CONFIG, FSDP2), step_bytes(CONFIG, replace(FSDP2, reduce_bytes=2))
    assert bf16.reduce_scatter * 2 == fp32.reduce_scatter > 0
    assert (bf16.all_gather, bf16.tp_all_reduce) == (fp32.all_gather, fp32.tp_all_reduce)


def test_two_ranks_reduce_scatter_half_the_fp32_gradients():
    # A ring reduce-scatter over n ranks sends (n - 1) / n of the gradient bytes from each.
    assert step_bytes(CONFIG, FSDP2).reduce_scatter == CONFIG.num_params() * 4 // 2


def test_each_micro_step_gathers_again_but_gradients_reduce_once():
    one, four = step_bytes(CONFIG, FSDP2), step_bytes(CONFIG, replace(FSDP2, grad_accum_steps=4))
    assert four.all_gather == 4 * one.all_gather
    assert four.reduce_scatter == one.reduce_scatter


def test_resharding_after_forward_gathers_all_blocks_but_the_last_again_in_backward():
    kept = step_bytes(CONFIG, replace(FSDP2, reshard_after_forward=False))
    resharded = step_bytes(CONFIG, FSDP2)
    blocks, _ = unit_elements(CONFIG, tp=1)
    assert resharded.all_gather - kept.all_gather == sum(blocks[:-1]) * 4 // 2


def test_one_data_parallel_rank_sends_no_fsdp_bytes_and_tp_sends_activations():
    tp2 = step_bytes(CONFIG, Layout(dp=1, tp=2, micro_batch_size=4, seq_len=16))
    assert (tp2.all_gather, tp2.reduce_scatter) == (0, 0)
    # 7 all-reduces of (4, 16, 32) fp32 activations per block (2 forward, 5 backward), each sending 2 * 1/2.
    assert tp2.tp_all_reduce == CONFIG.n_layers * 7 * 4 * 16 * 32 * 4
    assert tp2.total == tp2.tp_all_reduce


def test_tensor_parallel_splits_the_blocks_projections_not_their_norms():
    blocks1, root1 = unit_elements(CONFIG, tp=1)
    blocks2, root2 = unit_elements(CONFIG, tp=2)
    norms = 2 * CONFIG.dim
    assert [b - norms for b in blocks2] == [(b - norms) // 2 for b in blocks1]
    assert root2 == root1
