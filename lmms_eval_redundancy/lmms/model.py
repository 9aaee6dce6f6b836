"""The lmms-eval model ``llava_redundancy``: transformers' LLaVA classes with visual-token pruning."""

from __future__ import annotations

import atexit
import collections
import contextlib
import difflib
import functools
import inspect
import sys

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import LogitsProcessorList

from lmms_eval_redundancy.core.budget import KEEP_ALL, parse_budget
from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.registry import (
    UNPRUNED,
    MethodError,
    available_methods,
    build_method,
    param_names,
)
from lmms_eval_redundancy.core.values import positive_int, strict_bool
from lmms_eval_redundancy.lmms.ledger import (
    TokenLedger,
    output_path_from_argv,
    results_dir_for,
)
from lmms_eval_redundancy.runtime.compiling import check_compilable, compile_model
from lmms_eval_redundancy.runtime.decoding import Decoding
from lmms_eval_redundancy.runtime.efficiency import (
    BatchMeter,
    cache_bytes,
    sample_flops,
    tokens_per_layer,
    unpruned_tokens,
)
from lmms_eval_redundancy.runtime.engine import PruningEngine
from lmms_eval_redundancy.runtime.flops import llm_prefill_flops
from lmms_eval_redundancy.runtime.loading import PRETRAINED_FORMS, load, process_layout
from lmms_eval_redundancy.runtime.prompts import (
    chat_prompt,
    chat_template_of,
    load_video_frames,
)

BATCH_SIZE_USAGE = " (lmms-eval's --batch_size N; batches here have a fixed size, so `auto` is not supported)"


def scored_continuation(logprob: float, is_greedy: bool) -> GenerationResult:
    """A loglikelihood answer that lmms-eval 0.7.3 passes through unchanged.

    lmms-eval 0.7.3 (``unwrap_generation_output``) turns any response that is not a string or a
    ``GenerationResult`` into ``str(response)``, which breaks multiple-choice scoring; the pair travels
    inside a ``GenerationResult`` instead, whose ``text`` the evaluator hands on as it is.
    """
    return GenerationResult(text=(logprob, is_greedy))


def model_args_of(arg_string: str) -> dict:
    """lmms-eval's reading of ``--model_args`` (``true``/``false`` become bools, digits ints), checked."""
    try:
        args = utils.simple_parse_args_string(arg_string)
    except ValueError:
        raise UserError(f"--model_args {arg_string!r} is not a comma-separated list of key=value") from None
    if "pretrained" not in args:
        raise UserError(f"--model_args needs pretrained=: {PRETRAINED_FORMS}")
    return args


def key_hint(key: str, accepted: list[str]) -> str | None:
    """What an unknown model_args key may have meant: the methods that take it, or a close accepted key."""
    owners = [name for name in available_methods() if key in param_names(name)]
    if owners:
        return f"{key}= is a parameter of method {', '.join(owners)}"
    close = difflib.get_close_matches(key, accepted, n=1)
    return f"did you mean {close[0]}=?" if close else None


@contextlib.contextmanager
def user_errors_end_the_run(ledger: TokenLedger | None = None):
    """A ``UserError`` inside the block ends the process as ``SystemExit("llava_redundancy: error: ...")``
    (status 1, the message without a traceback), dropping ``ledger``'s records.

    lmms-eval catches every ``Exception`` from a model, prints its traceback and exits 0; ``SystemExit`` passes.
    """
    try:
        yield
    except UserError as err:
        if ledger is not None:
            ledger.discard()
        raise SystemExit(f"llava_redundancy: error: {err}") from None


def ending_the_run_on_user_errors(request):
    """A request method whose ``UserError``s end the run (``user_errors_end_the_run``) under lmms-eval."""

    @functools.wraps(request)
    def answer(self, requests):
        if not self.run_by_lmms_eval:
            return request(self, requests)
        with user_errors_end_the_run(self.ledger):
            return request(self, requests)

    return answer


class LlavaRedundancy(lmms):
    """LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision with a pruning ``method`` at a budget.

    model_args: ``pretrained`` (a checkpoint folder, a hub id or ``builtin:NAME``), ``method`` and its
    parameters, one budget (``retention=``, ``tokens=`` or ``threshold=``), ``anyres=full|base_only|per_view``,
    ``faithful`` (every parameter not given takes the value that reproduces the method's official code),
    ``log_keep_indices``, and the usual ``device``, ``dtype``, ``attn_implementation``, ``device_map``,
    ``max_frames_num``, ``chat_template``, ``revision``, ``trust_remote_code``, ``output_dir`` (where the token
    summary goes; default: lmms-eval's ``--output_path``).

    Decoding: methods before the LLM and ``none`` decode with transformers' static KV cache (compiled decoding
    step on a GPU), methods inside the LLM with the dynamic one (``runtime.decoding``); greedy outputs are the
    same. ``compile=true`` (default false) runs the vision tower and the LLM (prefill and decoding) under
    ``torch.compile``, the prompt left-padded to a multiple of 64 positions so that graphs are reused: each new
    shape compiles on first use (tens of seconds to minutes), greedy outputs stay the same
    (``runtime.compiling``). Methods inside the LLM refuse it.

    Booleans take ``true/false``, ``yes/no`` or ``1/0`` (any case); anything else is refused. The batch size is
    lmms-eval's ``--batch_size N`` (a whole number >= 1; ``auto`` is refused: batches here have a fixed size).
    lmms-eval always passes its own, so ``batch_size=`` in ``--model_args`` is refused; so is any key given both
    there and as an lmms-eval option (``--device``). ``max_batch_size`` (lmms-eval's ``--max_batch_size``, for
    ``auto``) is unused. Built by lmms-eval, a bad value ends the run with ``llava_redundancy: error: ...``
    and status 1 (``user_errors_end_the_run``); built directly, the ``UserError`` is raised.
    """

    is_simple = True
    run_by_lmms_eval = False  # set by create_from_arg_string: user errors then end the run

    def __init__(
        self,
        pretrained: str,
        method: str = UNPRUNED,
        retention: float | None = None,
        tokens: int | None = None,
        threshold: float | None = None,
        anyres: str = "full",
        faithful: bool = False,
        log_keep_indices: bool = False,
        compile: bool = False,
        device: str | None = None,
        dtype: str | None = "auto",
        attn_implementation: str | None = None,
        device_map: str | None = "",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval's --max_batch_size; batches here have a fixed size
        max_frames_num: int = 8,
        chat_template: str | None = None,
        revision: str = "main",
        trust_remote_code: bool = False,
        output_dir: str | None = None,
        **method_params,
    ) -> None:
        super().__init__()
        self._check_keys(method, method_params)
        budget = parse_budget(retention, tokens, threshold) or KEEP_ALL
        pruning = build_method(str(method), budget, faithful=strict_bool("faithful", faithful), **method_params)
        log_keep_indices = strict_bool("log_keep_indices", log_keep_indices)
        compiled = strict_bool("compile", compile)
        if compiled:
            check_compilable(pruning)
        trust_remote_code = strict_bool("trust_remote_code", trust_remote_code)
        self.batch_size_per_gpu = positive_int("batch_size", batch_size, BATCH_SIZE_USAGE)
        self.max_frames_num = positive_int("max_frames_num", max_frames_num, " (frames sampled per video)")
        self.accelerator = Accelerator()
        layout = process_layout(self.accelerator)
        self._rank, self._world_size = layout.rank, layout.world_size
        if self._world_size > 1 and device_map:
            raise UserError(
                "device_map spreads one model over devices in a single process; with accelerate launch "
                "--num_processes > 1 every process holds a whole model: drop device_map"
            )
        loaded = load(pretrained, device=None if self._world_size > 1 else device, dtype=dtype,
                      attn_implementation=attn_implementation, device_map=device_map, revision=revision,
                      trust_remote_code=trust_remote_code)
        self._model, self.processor = loaded.model, loaded.processor
        self._device = self._model.device
        self.processor.tokenizer.padding_side = "left"
        self.chat_template = chat_template_of(self.processor, chat_template)
        self.engine = PruningEngine(self._model, self.processor, loaded.family, pruning, anyres, log_keep_indices)
        if compiled:
            compile_model(self._model, loaded.family, pruning)
        self.decoding = Decoding.default(pruning.stage, compiled_llm=compiled)
        self.ledger = TokenLedger(self._rank, self._world_size, results_dir_for(pretrained, output_dir),
                                  {**self.engine.settings(), "compile": compiled, "pretrained": pretrained})
        self.batches_done = collections.Counter()  # per request type
        atexit.register(self.ledger.finish_at_exit)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LlavaRedundancy:
        """The model from lmms-eval's ``--model_args`` and its own options; user errors end the run."""
        with user_errors_end_the_run():
            args = model_args_of(arg_string)
            options = {k: v for k, v in (additional_config or {}).items() if v is not None}
            if "batch_size" in args:
                raise UserError(f"batch_size={args['batch_size']} in --model_args: the batch size is lmms-eval's own "
                                "option; drop batch_size= from --model_args and pass --batch_size N")
            twice = sorted(set(args) & set(options))
            if twice:
                raise UserError(f"{twice[0]} is given twice, in --model_args and as lmms-eval's --{twice[0]}; give it once")
            args.setdefault("output_dir", output_path_from_argv(sys.argv[1:], arg_string))
            model = cls(**args, **options)
        model.run_by_lmms_eval = True
        return model

    @staticmethod
    def _check_keys(method, method_params: dict) -> None:
        wrapper_keys = [p for p in inspect.signature(LlavaRedundancy.__init__).parameters if p not in ("self", "method_params")]
        accepted = param_names(str(method))
        unknown = sorted(set(method_params) - set(accepted))
        if unknown:
            hints = [hint for key in unknown for hint in [key_hint(key, wrapper_keys + accepted)] if hint]
            raise MethodError(
                f"unknown model_args key(s) {', '.join(unknown)} for llava_redundancy with method={method}"
                f"{''.join(f'; {hint}' for hint in hints)}; accepted keys: {', '.join(wrapper_keys + accepted)}"
            )

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    # ---- building one batch -------------------------------------------------------------------------

    def _visuals(self, doc_to_visual, task, split, doc_id) -> tuple[list, list]:
        """(images, videos) of one document; videos are frame arrays."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        images = [v.convert("RGB") for v in visuals if isinstance(v, Image.Image)]
        videos = [load_video_frames(v, self.max_frames_num) for v in visuals if isinstance(v, str)]
        if len(images) + len(videos) != len(visuals):
            kinds = sorted({type(v).__name__ for v in visuals})
            raise TypeError(f"{task} doc {doc_id}: visuals must be PIL images or video paths, got {kinds}")
        return images, videos


    def _prompt(self, context: str, n_images: int, n_videos: int, continuation: str | None = None) -> str:
        return chat_prompt(self.processor, self.chat_template, context, n_images, n_videos, continuation)

    def _build(self, requests_args: list[tuple], texts: list[str] | None = None, continuations=None):
        """Processor inputs and pruned LLM inputs for a batch of (context, _, doc_to_visual, doc_id, task, split)."""
        prompts, images, videos, n_images, n_videos, n_frame_images, keys = [], [], [], [], [], [], []
        for i, (context, _, doc_to_visual, doc_id, task, split) in enumerate(requests_args):
            sample_images, sample_videos = self._visuals(doc_to_visual, task, split, doc_id)
            frame_images = []
            if sample_videos and not self.engine.family.native_video:
                # Families without video input see the sampled frames as a sequence of images.
                frame_images = [Image.fromarray(f) for v in sample_videos for f in v]
                sample_images, sample_videos = sample_images + frame_images, []
            cont = continuations[i] if continuations else None
            prompts.append(self._prompt(context, len(sample_images), len(sample_videos), cont))
            if sample_images:
                images.append(sample_images)  # nested per sample: OneVision gives multi-image samples base views only
            videos += sample_videos
            n_images.append(len(sample_images))
            n_videos.append(len(sample_videos))
            n_frame_images.append(len(frame_images))
            keys.append(f"{task}/{split}/{doc_id}")
        inputs = self.engine.processor_inputs(prompts, images, videos)
        batch, records = self.engine.prune(inputs, n_images, n_videos, keys, n_frame_images,
                                           texts=[context for context, *_ in requests_args])
        return prompts, batch, records

    def _log_records(self, request: str, requests_args, batch, records, meter: BatchMeter, cache=None) -> None:
        """Token records and per-sample efficiency (batch-level costs shared evenly by its samples; the batch's
        index among this process's batches of ``request``, so that readers can leave out the warm-up)."""
        size = len(requests_args)
        shared = {key: value if key == "peak_memory_bytes" else value / size for key, value in meter.phases().items()}
        shared["batch_index"] = self.batches_done[request]  # 0: this process's warm-up batch of this request type
        self.batches_done[request] += 1
        if cache is not None:
            shared["kv_cache_bytes"] = cache_bytes(cache) / size
        layers = self._model.config.text_config.num_hidden_layers
        for row, ((_, _, _, doc_id, task, split), sample_records) in enumerate(zip(requests_args, records)):
            llm_tokens = tokens_per_layer(int(batch.attention_mask[row].sum()), sample_records, layers)
            flops = sample_flops(self._model.config, llm_tokens, batch.vision_tiles[row])
            unpruned = len(llm_tokens) * [unpruned_tokens(int(batch.attention_mask[row].sum()), sample_records)]
            flops["llm_prefill_flops_unpruned"] = llm_prefill_flops(self._model.config.text_config, unpruned)
            self.ledger.add(request, task, split, doc_id, sample_records, {**shared, **flops, "batch_size": size})
        self.ledger.flush()

    # ---- lmms-eval API ------------------------------------------------------------------------------

    @ending_the_run_on_user_errors
    def generate_until(self, requests) -> list[str]:
        results = []
        collator = utils.Collator([r.args for r in requests], lambda x: (-len(x[0]), x[0]), grouping=True)
        progress = tqdm(total=len(requests), disable=self._rank != 0, desc="llava_redundancy generate")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            gen_kwargs = dict(chunk[0][1])
            until = gen_kwargs.pop("until", None) or [self.tokenizer.eos_token]
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            max_new_tokens, num_beams = int(gen_kwargs.get("max_new_tokens", 1024)), int(gen_kwargs.get("num_beams", 1))
            with BatchMeter(self._device, self.engine) as meter:
                _, batch, records = self._build(chunk)
                with torch.no_grad(), self.engine.around_llm(batch, records, max_new_tokens):
                    output = self._model.generate(
                        **self.decoding.generate_inputs(self._model, batch.inputs_embeds, batch.attention_mask,
                                                        max_new_tokens, num_beams),
                        max_new_tokens=max_new_tokens,
                        do_sample=temperature > 0,
                        temperature=temperature if temperature > 0 else None,
                        top_p=gen_kwargs.get("top_p") if temperature > 0 else None,
                        num_beams=num_beams,
                        pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=self.tokenizer.eos_token_id,
                        suppress_tokens=self.engine.family.placeholder_ids,
                        logits_processor=LogitsProcessorList([meter.clock]),
                        return_dict_in_generate=True,
                    )
            self._log_records("generate_until", chunk, batch, records, meter, output.past_key_values)
            for text in self.tokenizer.batch_decode(output.sequences, skip_special_tokens=True):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", None, text)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    @ending_the_run_on_user_errors
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        progress = tqdm(total=len(requests), disable=self._rank != 0, desc="llava_redundancy loglikelihood")
        args = [r.args for r in requests]
        for start in range(0, len(args), self.batch_size):
            chunk = args[start:start + self.batch_size]
            continuations = [
                target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                for _, target, _, doc_id, task, split in chunk
            ]
            with BatchMeter(self._device, self.engine) as meter:
                prompts, batch, records = self._build(chunk, continuations=continuations)
                with torch.no_grad(), self.engine.around_llm(batch, records):
                    logits = self._model(**self.decoding.forward_inputs(batch.inputs_embeds, batch.attention_mask)).logits
            self._log_records("loglikelihood", chunk, batch, records, meter)
            for row, (prompt, cont) in enumerate(zip(prompts, continuations)):
                n = len(self.tokenizer(prompt).input_ids) - len(self.tokenizer(prompt[: len(prompt) - len(cont)]).input_ids)
                if n <= 0:
                    raise ValueError(f"continuation {cont!r} tokenizes to nothing; cannot score it")
                target = batch.input_ids[row, -n:]
                logprobs = torch.log_softmax(logits[row, -n - 1:-1].float(), dim=-1)
                score = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all())
                results.append(scored_continuation(score, greedy))
            progress.update(len(chunk))
        progress.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "llava_redundancy does not support multi-round generation: pruning is decided once per prompt; "
            "run single-round tasks (generate_until or loglikelihood)"
        )
