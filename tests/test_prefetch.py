"""Batches reach the device one step ahead; checkpoints keep the loader as of the trained steps;
data.num_workers = "auto"."""

import pytest
import torch

from titan_mm.config import ConfigError, Data
from titan_mm.data.dataloader import (build_dataloader, check_data_shards, data_states, resolve_num_workers,
                                      worker_memory_bytes)
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.models.llava import FLAVORS
from titan_mm.train.prefetch import DevicePrefetcher

SPEC = FLAVORS["debug"].vision_input
KEYS = ("input_ids", "labels", "pixel_values", "grid_thw", "image_token_index")


def loader(num_workers=0, pin_memory=False):
    cfg = Data(image_slots_per_row=10, patches_per_slot=64, min_pixels=1024, max_pixels=4096,
               num_workers=num_workers)
    return build_dataloader(cfg, Tokenizer("assets/tokenizer"), SPEC, seq_len=256, batch_size=1, dp_rank=0,
                            dp_world=1, seed=0, pin_memory=pin_memory)


def prefetcher(dl, read_ahead: bool, device="cpu", microbatches=2) -> DevicePrefetcher:
    return DevicePrefetcher(dl, torch.device(device), microbatches, lambda mb: mb, data_states(dl, 0),
                            read_ahead=read_ahead)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_checkpoint_taken_while_reading_ahead_resumes_at_the_next_untrained_batch(num_workers):
    """Three steps of 2 microbatches, each followed by a read-ahead of the next step: the state
    saved then must give, on resume, exactly the read-ahead batches (the loader itself is already
    past them)."""
    dl = loader(num_workers)
    batches = prefetcher(dl, read_ahead=True)
    for _ in range(3):
        batches.next_step()
        batches.prefetch()
    (state,) = [s.state_dict() for s in batches.checkpoint_states().values()]
    ahead, _ = batches.next_step()
    resumed = loader(num_workers)
    (target,) = data_states(resumed, 0).values()
    target.load_state_dict(state)
    it = iter(resumed)
    for want in ahead:
        got = next(it)
        for k in KEYS:
            assert torch.equal(got[k], want[k]), k


def test_without_read_ahead_each_step_reads_its_own_batches_and_reports_the_wait():
    dl = loader()
    reference = iter(loader())
    batches = prefetcher(dl, read_ahead=False)
    for _ in range(2):
        batches.prefetch()  # a no-op when not reading ahead
        step, wait_s = batches.next_step()
        assert batches.ready is None and wait_s > 0
        for got in step:
            want = next(reference)
            assert all(torch.equal(got[k], want[k]) for k in KEYS)


def test_resuming_with_another_worker_count_names_the_count_to_set():
    dl = loader(num_workers=0)
    next(iter(dl))
    state = dl.state_dict()
    (target,) = data_states(loader(num_workers=2), 0).values()
    with pytest.raises(ConfigError, match="set data.num_workers = 0"):
        target.load_state_dict(state)


def test_auto_workers_share_this_process_cpus_among_the_local_ranks(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("titan_mm.data.dataloader.available_host_memory", lambda: 2**40)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_workers(Data(num_workers="auto"), SPEC.patch_dim) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_num_workers(Data(num_workers="auto"), SPEC.patch_dim) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert resolve_num_workers(Data(num_workers="auto"), SPEC.patch_dim) == 0
    assert resolve_num_workers(Data(num_workers=3), SPEC.patch_dim) == 3
    # data shards are read in the training process: auto is 0 there, an explicit count an error
    assert resolve_num_workers(Data(num_workers="auto", num_shards=4), SPEC.patch_dim) == 0
    assert check_data_shards(Data(num_workers="auto", num_shards=4), 2, 2) == 2
    with pytest.raises(ConfigError, match="needs data.num_workers = 0"):
        check_data_shards(Data(num_workers=2, num_shards=4), 2, 2)


def test_auto_workers_fit_their_open_rows_in_half_the_host_memory(monkeypatch):
    """The Qwen3-VL-2B budgets (6 x 4096 patches of 1536 values, 64 open rows) on a 16-CPU host with
    125 GiB available: 6.4 workers' worth of open rows fit in half of it, so 6 workers, not 15."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("titan_mm.data.dataloader.available_host_memory", lambda: 125 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cfg = Data(num_workers="auto", image_slots_per_row=6, patches_per_slot=4096, pack_open_bins=64)
    assert worker_memory_bytes(cfg, 1536) == 65 * 6 * 4096 * 1536 * 4
    assert resolve_num_workers(cfg, 1536) == 6
    # never fewer than one worker while there are CPUs to spare
    monkeypatch.setattr("titan_mm.data.dataloader.available_host_memory", lambda: 2**30)
    assert resolve_num_workers(cfg, 1536) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_arrive_on_the_gpu_from_pinned_memory_equal_to_the_host_batches():
    batches = prefetcher(loader(pin_memory=True), read_ahead=True, device="cuda")
    reference = iter(loader())
    for _ in range(3):
        step, _ = batches.next_step()
        batches.prefetch()
        for got in step:
            want = next(reference)
            for k in KEYS:
                assert got[k].is_cuda and torch.equal(got[k].cpu(), want[k]), k
    assert next(iter(loader(pin_memory=True)))["pixel_values"].is_pinned()
