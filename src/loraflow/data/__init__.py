"""Data: read a source, make rows, format prompts, tokenise, pack.

    prepared = data.prepare(cfg)                       # rows per split + counts + digest
    examples = data.tokenize_sft(rows, tokenizer, cfg)  # prompt tokens masked out of the loss
    blocks = data.packed_training_examples(rows, tokenizer, cfg)  # what the trainer gets, per data.packing

readers: files, folders, the Hub, the built-in catalogue; rows: normalise, template, count, split;
tokens: prompt formatting (chat templates) and completion-only labels; packing: blocks and batches
for the trainer; inputs: prepared data as a run's dataset inputs. The prepare stage is
`loraflow.stages.prepare`. The names below are the package's interface.
"""
from loraflow.data.inputs import log_prepared, log_split_input
from loraflow.data.packing import (best_fit_decreasing, constant_blocks, cpt_blocks, fixed_blocks,
                                   head_on_labelled_positions, joined_rows, pack_rows, packed_training_examples,
                                   pad_row_blocks, training_examples)
from loraflow.data.rows import (SPLITS, PreparedData, comparison_key, conversation_row, fill_template, normalise_text,
                                prepare, records_to_rows, required_fields, template_fields,
                                split_rows, strip_html_tags)
from loraflow.data.tokens import (ANSWER_PROBE, IGNORE_INDEX, chat_pieces, chat_turn_end, conversation_token_ids,
                                  end_of_target, fit_to_length, format_prompt, missing_bos, prompt_messages,
                                  prompt_token_ids, render_chat, sft_token_ids, tokenize_seq2seq, tokenize_sft,
                                  uses_chat_template)
