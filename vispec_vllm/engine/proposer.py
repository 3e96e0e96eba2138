"""`ViSpecProposer`: vLLM's V1 EAGLE proposer, driving a ViSpec draft.

Installed in place of `EagleProposer` by `vispec_vllm.engine.patches`. For any draft that is not a ViSpec
draft it is exactly the stock proposer. For a ViSpec draft it replaces `propose` with the chain below, which
reuses vLLM's sampling and metadata but builds the draft inputs itself:

1. EAGLE shift: slot p pairs the target hidden state h_p with the next token x_{p+1}.
2. Positions are the raw token index (the draft was trained with 1-D RoPE, even on M-RoPE targets; vLLM
   would hand it the temporal M-RoPE index, which lags the token index after an image: vllm#54498).
3. Image inputs come from per-request state (`ImageStateStore`): compressed tokens at the last num_q-1
   slots of each image, the global feature g for later slots, and dropped image slots hidden from attention.
   A request whose images cannot be handled is drafted text-only (logged); the target still verifies it.
4. Draft KV lives in the target's slots (same block table), read and written by vLLM's attention backend
   with vLLM's own metadata and per-step slot update; dropped image slots are hidden by `FlaggedHeads`.
5. CUDA-ready by construction: every forward reads persistent buffers (the stock ones for ids, positions and
   hidden states, the draft's `StepInputBuffers` for image inputs) padded to the size vLLM's CUDA-graph
   dispatcher picks, so the compiled draft core replays piecewise graphs like vLLM's own EAGLE drafts; a
   decode step makes no device-to-host sync and no pageable host-to-device copy (`tests/test_host_syncs.py`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.v1.spec_decode.eagle import EagleProposer
from vllm.v1.utils import CpuGpuBuffer

from vispec_vllm.engine.image_encoder import TargetImageEncoder
from vispec_vllm.engine.image_state import (
    ADAPTOR_CACHE_BYTES_ENV,
    BatchImageTables,
    ImageStateStore,
    adaptor_cache_bytes,
)
from vispec_vllm.engine.kv_groups import check_draft_shares_target_kv_group
from vispec_vllm.engine.profile_inputs import largest_image_inputs
from vispec_vllm.engine.step_inputs import StepInputBuffers, chain_global_term, token_image_inputs
from vispec_vllm.engine.validation import check_draft_against_target
from vispec_vllm.kernels.dropped_keys import dropped_block_order
from vispec_vllm.model_names import is_vispec_architecture

logger = init_logger(f"vllm.{__name__}")  # under vLLM's configured logger, so the lines show


class ViSpecProposer(EagleProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        architectures = self.draft_model_config.hf_config.architectures or []
        self.is_vispec = any(is_vispec_architecture(a) for a in architectures)
        if not self.is_vispec:
            return
        self.runner = runner
        if self.uses_mrope:  # the draft config names an M-RoPE target; the draft itself uses 1-D RoPE
            self.uses_mrope = False
            self.positions = torch.zeros(self.max_positions, dtype=torch.int64, device=device)
        self.image_states: ImageStateStore | None = None
        self.step_inputs: StepInputBuffers | None = None  # the draft's own, bound in load_model
        # the token after a partial-prefill chunk, staged in (pinned) host memory
        self.following_token_ids = CpuGpuBuffer(self.max_batch_size, dtype=torch.int32, device=device)
        self.recorder = None  # optional `ProposalRecorder` (tests): what each propose() got and drafted

    # ------------------------------------------------------------------ set-up
    def load_model(self, target_model: torch.nn.Module) -> None:
        super().load_model(target_model)
        if not self.is_vispec:
            return
        # ViSpec drafts read whole images from the runner's encoder cache; only stage-1 drafts take the
        # per-step vision-feature slices (at image slots, as EAGLE was trained).
        if self.model.num_q is not None:
            self.supports_mm_inputs = False
        check_draft_against_target(self.model, self.vllm_config)
        self.step_inputs = self.model.step_inputs
        if self.model.num_q is not None:
            cache_bytes = adaptor_cache_bytes()
            self.image_states = ImageStateStore(
                num_q=self.model.num_q,
                hidden_size=self.hidden_size,
                adapt=self.model.adapt_image,
                reencode=TargetImageEncoder(target_model, self.device),
                device=self.device,
                dtype=self.dtype,
                cache_bytes=cache_bytes,
            )
            entry_bytes = self.model.num_q * self.hidden_size * self.dtype.itemsize
            logger.info(
                "ViSpec adaptor-output cache: %.1f MiB on the device, outside vLLM's KV budget (%s; %d images of "
                "%d bytes)",
                cache_bytes / 2**20,
                ADAPTOR_CACHE_BYTES_ENV,
                cache_bytes // entry_bytes,
                entry_bytes,
            )
        draft_vocab_size = self.model.vispec_config.draft_vocab_size
        logger.info(
            "ViSpec draft loaded: num_q=%s (%s), 1-D RoPE over raw token positions, %s",
            self.model.num_q,
            "vision-aware" if self.model.num_q else "stage-1 text EAGLE: images are not compressed",
            "full target vocabulary" if draft_vocab_size is None
            else f"draft vocabulary of {draft_vocab_size} target ids",
        )

    def validate_same_kv_cache_group(self, kv_cache_config) -> None:
        """vLLM checks only that the draft layers share a group; the draft KV lives in the target's slots, so the
        draft layer must share the target's group (one block table): a hybrid target is refused here."""
        if not self.is_vispec:
            super().validate_same_kv_cache_group(kv_cache_config)
            return
        check_draft_shares_target_kv_group(kv_cache_config, self._draft_attn_layer_names)

    def dummy_run(
        self,
        num_tokens: int,
        use_cudagraphs: bool = True,
        is_graph_capturing: bool = False,
        slot_mappings: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """vLLM's dummy forwards (memory profile, compilation, graph capture), after the image path's own work at
        its largest: the adaptor over the largest image, and image inputs for all `num_tokens` slots. The
        adaptor-output cache's whole byte budget is held through it, so the profiled peak leaves room for the
        cache, which fills later on the device."""
        if not (self.is_vispec and self.image_states is not None and not is_graph_capturing):
            super().dummy_run(num_tokens, use_cudagraphs, is_graph_capturing, slot_mappings)
            return
        cache_budget = torch.empty(self.image_states.adaptor_cache.max_bytes, dtype=torch.uint8, device=self.device)
        self._write_largest_image_inputs(num_tokens)  # its temporaries are freed before the forwards below
        super().dummy_run(num_tokens, use_cudagraphs, is_graph_capturing, slot_mappings)
        del cache_budget

    def _write_largest_image_inputs(self, num_tokens: int) -> None:
        image_inputs = largest_image_inputs(self.model, self.runner, num_tokens)
        if image_inputs is not None:
            self.step_inputs.write(image_inputs)

    # ------------------------------------------------------------------ next token after a partial prefill
    def prepare_next_token_ids_padded(self, sampled_token_ids, requests, gpu_input_batch, discard_request_mask):
        next_token_ids, valid_count = super().prepare_next_token_ids_padded(
            sampled_token_ids, requests, gpu_input_batch, discard_request_mask
        )
        if not self.is_vispec:
            return next_token_ids, valid_count
        # vLLM 0.32 uses the *last prompt token* as the next token of a partial-prefill chunk; the draft slot at
        # the end of the chunk pairs with the token right after the chunk. Decided on the host: a batch without
        # a partial prefill (every decode step) costs nothing here.
        num_reqs = gpu_input_batch.num_reqs
        chunk_end = gpu_input_batch.num_computed_tokens_cpu[:num_reqs] + self.runner.num_scheduled_tokens.np[:num_reqs]
        num_known = gpu_input_batch.num_tokens_no_spec[:num_reqs]
        if not (chunk_end < num_known).any():
            return next_token_ids, valid_count
        rows = np.arange(num_reqs)
        self.following_token_ids.np[:num_reqs] = gpu_input_batch.token_ids_cpu[rows, chunk_end.clip(max=num_known - 1)]
        following = self.following_token_ids.copy_to_gpu(num_reqs)
        return torch.where(discard_request_mask[:num_reqs], following, next_token_ids), valid_count

    # ------------------------------------------------------------------ drafting
    def propose(
        self,
        num_speculative_tokens: int,
        target_token_ids: torch.Tensor,  # [T]
        target_positions: torch.Tensor,  # [T] or [3, T] (M-RoPE); unused: raw positions come from seq_lens
        target_hidden_states: torch.Tensor,  # [T, H]
        next_token_ids: torch.Tensor,  # [B]
        token_indices_to_sample: torch.Tensor | None,  # [B]
        common_attn_metadata,
        sampling_metadata,
        mm_embed_inputs: Any = None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,  # [B]
        slot_mappings: Any = None,
    ) -> torch.Tensor:
        if not self.is_vispec:
            return super().propose(
                num_speculative_tokens,
                target_token_ids,
                target_positions,
                target_hidden_states,
                next_token_ids,
                token_indices_to_sample,
                common_attn_metadata,
                sampling_metadata,
                mm_embed_inputs,
                num_rejected_tokens_gpu,
                slot_mappings,
            )
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        cad = common_attn_metadata
        num_rows = cad.num_reqs
        device = target_hidden_states.device
        qsl = cad.query_start_loc[: num_rows + 1].long()
        if token_indices_to_sample is None:
            token_indices_to_sample = qsl[1:] - 1
        sample_index = token_indices_to_sample.long()
        num_tokens = target_token_ids.shape[0]

        # 1. EAGLE shift: [a0 a1 a2 | b0 b1] -> [a1 a2 next_a | b1 next_b]
        # (rows padded with rejected tokens keep valid-but-unused ids after their sample index)
        input_ids = self.input_ids[:num_tokens]
        input_ids.copy_(torch.roll(target_token_ids, -1))
        input_ids[sample_index] = next_token_ids.to(input_ids.dtype)
        self.hidden_states[:num_tokens].copy_(target_hidden_states)

        # 2. raw token positions: the query of row b ends at seq_len[b]
        rows = torch.arange(num_rows, device=device)
        query_lens = qsl[1:] - qsl[:-1]
        row_of_token = torch.repeat_interleave(rows, query_lens, output_size=num_tokens)
        seq_lens = cad.seq_lens[:num_rows].long()
        positions = (seq_lens - query_lens)[row_of_token] + torch.arange(num_tokens, device=device) - qsl[row_of_token]
        self.positions[:num_tokens].copy_(positions)

        req_ids = self.runner.input_batch.req_ids[:num_rows]
        if self.recorder is not None:
            valid_len = query_lens if num_rejected_tokens_gpu is None else query_lens - num_rejected_tokens_gpu.long()
            self.recorder.record_inputs(
                req_ids,
                row_of_token,
                positions,
                input_ids,
                target_hidden_states,
                valid_len,
                self.runner.encoder_cache,
                self.runner.requests,
            )
        tables = self._image_tables(req_ids)
        chain_global = read_blocks = None  # a draft without images never writes its step inputs: zeros stay
        if tables is not None:
            chain_global, read_blocks = self._write_image_inputs(
                tables, cad.block_table_tensor[:num_rows], row_of_token, positions, seq_lens - query_lens, sample_index
            )
            if self.recorder is not None:
                self.recorder.record_skipped_keys(req_ids, read_blocks[1])
        with_embeds = mm_embed_inputs is not None and self.supports_mm_inputs
        if with_embeds:  # a stage-1 draft takes the target's vision features at image slots
            mm_embeds, is_mm_embed = mm_embed_inputs
            self.inputs_embeds[:num_tokens] = self.model.embed_input_ids(input_ids, mm_embeds, is_mm_embed[:num_tokens])
        last_hidden, hidden = self._forward(cad, read_blocks, num_tokens, with_embeds=with_embeds)
        if num_speculative_tokens == 0:  # dynamic speculation chose no drafts: the pass above kept the KV in sync
            return torch.empty(num_rows, 0, dtype=torch.int64, device=device)
        draft_ids, draft_probs = self._sample_draft_tokens(last_hidden[sample_index], sampling_metadata)
        all_ids, all_probs = [draft_ids], [draft_probs]

        # 3. chain: one more token per row per step, fed the draft's own hidden state, with the same g
        positions = positions[sample_index]
        hidden = hidden[sample_index]
        if tables is not None:
            self.step_inputs.write_text_slots(chain_global)
        cad.num_actual_tokens = num_rows
        cad.max_query_len = 1
        cad.query_start_loc = self.arange[: num_rows + 1]
        cad.query_start_loc_cpu = torch.from_numpy(self.token_arange_np[: num_rows + 1]).clone()
        if num_rejected_tokens_gpu is not None:
            cad.seq_lens -= num_rejected_tokens_gpu  # as the stock proposer: drop the rejected padding
        chain_execution = self._determine_batch_execution_and_padding(num_rows)
        for step in range(1, num_speculative_tokens):
            # positions + 1 (0 past max_model_len), slots from the block table, seq_lens + 1: vLLM's own update
            positions = self._update_positions_dependent_metadata(
                positions, cad, num_rows, chain_execution[1], self.block_size
            )
            self.input_ids[:num_rows] = all_ids[-1]
            self.hidden_states[:num_rows] = hidden
            last_hidden, hidden = self._forward(cad, read_blocks, num_rows, chain_execution, draft_index=step)
            draft_ids, draft_probs = self._sample_draft_tokens(last_hidden, sampling_metadata)
            all_ids.append(draft_ids)
            all_probs.append(draft_probs)

        if all_probs[0] is not None:
            self._last_draft_probs = torch.stack(all_probs, dim=1).contiguous()
        drafts = torch.stack(all_ids, dim=1)  # [B, K]
        if self.recorder is not None:
            self.recorder.record_proposal(req_ids, drafts)
        return drafts

    def _forward(
        self,
        cad,
        read_blocks: tuple[torch.Tensor, torch.Tensor] | None,
        num_tokens: int,
        batch_execution: tuple | None = None,
        draft_index: int = 0,
        with_embeds: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft forward over the first `num_tokens` rows of the persistent buffers, padded to the size (and
        run in the CUDA-graph mode) vLLM's dispatcher picks; returns the unpadded [num_tokens, H] outputs.

        read_blocks: (block table, keys taken out per row) from `dropped_block_order`, or None: the kernel reads
        the keys through that table; the KV write still goes to `cad`'s slots.
        """
        cudagraph_mode, num_input_tokens, num_tokens_across_dp = (
            batch_execution or self._determine_batch_execution_and_padding(num_tokens)
        )
        read_cad = cad
        if read_blocks is not None:
            block_table, skipped = read_blocks
            num_rows = block_table.shape[0]
            seq_lens = cad.seq_lens[:num_rows] - skipped.to(cad.seq_lens.dtype)
            read_cad = replace(cad, seq_lens=seq_lens, block_table_tensor=block_table)
        _, per_layer_metadata = self.build_per_group_and_layer_attn_metadata(read_cad, draft_index=draft_index)
        with set_forward_context(
            per_layer_metadata,
            self.vllm_config,
            num_tokens=num_input_tokens,
            num_tokens_across_dp=num_tokens_across_dp,
            cudagraph_runtime_mode=cudagraph_mode,
            slot_mapping=self._get_slot_mapping(num_input_tokens, cad.slot_mapping if draft_index == 0 else None),
        ):
            last_hidden, hidden = self.model(
                input_ids=self.input_ids[:num_input_tokens],
                positions=self.positions[:num_input_tokens],
                hidden_states=self.hidden_states[:num_input_tokens],
                inputs_embeds=self.inputs_embeds[:num_input_tokens] if with_embeds else None,
            )
        return last_hidden[:num_tokens], hidden[:num_tokens]

    def _write_image_inputs(
        self, tables: BatchImageTables, block_table, row_of_token, positions, query_start, sample_index
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Fill the step inputs of the first pass; return the chain steps' global term ([B, H]) and the blocks
        the draft attention reads."""
        num_rows, num_blocks = block_table.shape
        if tables.all_images_before(self.runner.input_batch.num_computed_tokens_cpu[:num_rows]):
            # decode: every query is a text slot after its row's images; all of this is fixed per batch
            after = tables.after_images(num_blocks, self.block_size)
            self.step_inputs.write_text_slots(after.global_term[row_of_token])
            chain_global = after.global_term
            order, skipped = after.block_order, after.skipped_keys
        else:
            self.step_inputs.write(token_image_inputs(tables, row_of_token, positions))
            chain_global = chain_global_term(tables, positions[sample_index] + 1)
            order, skipped = dropped_block_order(tables.dropped_ranges, query_start, num_blocks, self.block_size)
        return chain_global, (block_table.gather(1, order), skipped)

    def _image_tables(self, req_ids: list[str]) -> BatchImageTables | None:
        if self.image_states is None:
            return None
        self.image_states.update(req_ids, self.runner.requests, self.runner.encoder_cache)
        return self.image_states.tables(req_ids)
