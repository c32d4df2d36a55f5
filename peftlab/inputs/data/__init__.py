"""Task data: records -> a seeded train/eval split -> tokenized examples -> length-grouped batches.

A tokenized example is ``{"input_ids": list[int], "labels": list[int]}`` for instruction and
causal_lm (labels are -100 where no loss is taken, NOT shifted: the loss code shifts), or
``{"input_ids": list[int], "label": int}`` for classification. Nothing is padded here: padding
happens per batch in ``batches`` (to the longest example of the batch, never to max_length).

The modules, in the order data flows through them:

* ``sources``: where records come from (embedded alias, local file, hub dataset) and their fields.
* ``split``: the seeded train/eval split.
* ``conversations``: instruction data formats (alpaca, messages, sharegpt) read into checked turns.
* ``formats``: the Alpaca and plain prompts and encoding (what one example's ids and labels are).
* ``templates``: which template renders instruction data, and the chat template's encoding.
* ``tasks``: ``TaskData`` and ``load_task_data``, one builder per task.
* ``batching``: length-grouped, dynamically padded batches and token-capped pieces.

Everything other modules use is importable from here, as it was from the single data.py.
"""

from peftlab.inputs.data.batching import MEGABATCH_FACTOR, batch_indices, batches, collate, num_batches, split_by_tokens
from peftlab.inputs.data.formats import (
                                          ALPACA_PROMPT,
                                          ALPACA_PROMPT_NO_INPUT,
                                          IGNORE_INDEX,
                                          causal_chunks,
                                          encode_prompt,
                                          encode_response,
                                          end_of_text_id,
                                          format_prompt,
                                          instruction_example,
)
from peftlab.inputs.data.sources import FILE_TYPES, TASK_FIELDS, check_utf8, load_rows, select_fields
from peftlab.inputs.data.split import contiguous_split, eval_count, split_indices
from peftlab.inputs.data.tasks import EvalPrompt, TaskData, label_mapping, load_task_data, prompt_for

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FILE_TYPES", "IGNORE_INDEX", "MEGABATCH_FACTOR", "TASK_FIELDS",
    "EvalPrompt", "TaskData", "batch_indices", "batches", "causal_chunks", "check_utf8", "collate", "contiguous_split",
    "encode_prompt", "encode_response", "end_of_text_id", "eval_count", "format_prompt", "instruction_example",
    "label_mapping", "load_rows", "load_task_data", "num_batches", "prompt_for", "select_fields", "split_by_tokens",
    "split_indices",
]
