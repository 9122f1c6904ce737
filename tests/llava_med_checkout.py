"""A stand-in for a microsoft/LLaVA-Med v1.0.0 checkout: the files medvlm reads, with the same names and
the same shape of Python (where the values sit and what the code does with them), but medvlm's own
placeholder texts — LLaVA-Med's licence does not let medvlm ship its text, tests included.

Every file starts by raising, so a reader that imported or ran one instead of parsing it would fail.
"""

from __future__ import annotations

from pathlib import Path

NEVER_RUN = 'raise RuntimeError("parsed, never run")\n\n'

SYSTEM = "PLACEHOLDER SYSTEM PROMPT.\n\n  Talk about the figure as if you could see it.\n  "
RUBRIC = "PLACEHOLDER RUBRIC. Score both assistants from 1 to 10 on the first line."
JUDGE_SYSTEM = "'PLACEHOLDER JUDGE SYSTEM MESSAGE."
CLEANING = {"drop_turn_if_reply_contains": ("i cannot see", "no access"),
            "strip_reply_prefixes": ("per the legend, ", "the legend says "),
            "remove_from_reply": (", as the legend says", " in the legend text"),
            "drop_turn_if_reply_still_contains": ("legend", "writeup")}

GENERATE = NEVER_RUN + f'''import json


class PromptGenerator:

  @staticmethod
  def few_shot_messages_gen(query_context, use_inline_mentions=True):
    messages = [
    {{"role": "system", "content": {SYSTEM!r}}},
    ]
    messages.append({{"role": "user", "content": query_context}})
    return messages
'''

FEW_SHOT = NEVER_RUN + '''fs = [{'conversations': [{'from': 'human', 'value': 'What kind of picture is this?'},
                        {'from': 'gpt', 'value': 'A placeholder radiograph.'},
                        {'from': 'human', 'value': 'Anything unusual?'},
                        {'from': 'gpt', 'value': 'A placeholder shadow.'}],
       'domain': {'chest_xray': True, 'ct_scan': False, 'gross': False, 'histology': False, 'mri': False},
       'fig_caption': 'Placeholder legend one.',
       'fig_label': 'Figure 1',
       'in_text_mention': ['Placeholder mention one.', {'tokens': 'Placeholder mention two.'}],
       'pair_id': '1_F1'},
      {'conversations': [{'from': 'human', 'value': 'Which stain is used?'},
                        {'from': 'gpt', 'value': 'A placeholder stain.'}],
       'fig_caption': 'Placeholder legend two.',
       'fig_label': 'Figure 2',
       'in_text_mention': [],
       'pair_id': '2_F2'}]
'''

POSTPROCESS = NEVER_RUN + f'''import copy


def pairwise(items):
  it = iter(items)
  return zip(it, it)


def clean_conv(x):
  kept = []
  for human_turn, gpt_turn in pairwise(x['conversations']):
    if any(key in gpt_turn['value'].lower() for key in {list(CLEANING["drop_turn_if_reply_contains"])!r}):
      continue
    handled = False
    for key in {list(CLEANING["strip_reply_prefixes"])!r}:
      if gpt_turn['value'].lower().startswith(key):
        gpt_turn['value'] = gpt_turn['value'][len(key):].capitalize()
        if not any(key in gpt_turn['value'] for key in {list(CLEANING["drop_turn_if_reply_still_contains"])!r}):
          kept.extend([human_turn, gpt_turn])
        handled = True
        break
    if handled:
      continue
    for key in {list(CLEANING["remove_from_reply"])!r}:
      if key in gpt_turn['value']:
        gpt_turn['value'] = gpt_turn['value'].replace(key, '')
    if any(key in gpt_turn['value'] for key in {list(CLEANING["drop_turn_if_reply_still_contains"])!r}):
      continue
    kept.extend([human_turn, gpt_turn])
  return kept
'''

JUDGE_V1 = NEVER_RUN + f'''class LLMEvalPromptGenerator:

  instruct_prompt = {RUBRIC!r}
  role = 'Assistant'

  @staticmethod
  def compare_messages_gen(sample):
    messages = [
    {{"role": "system", "content": {JUDGE_SYSTEM!r}}},
    ]
    return messages
'''

# LLaVA-Med's main branch keeps the rubric as a module constant (and has no instruct files).
JUDGE_MAIN = NEVER_RUN + f'''INSTRUCT_PROMPT = {RUBRIC!r}
ROLE = 'Assistant'


def compare_messages_gen(fig_label, fig_caption, fig_context, question, ans1, ans2):
  return [{{"role": "system", "content": {JUDGE_SYSTEM!r}}}]
'''


def make_checkout(root: Path, branch: str = "v1.0.0") -> Path:
    """Write the stand-in checkout under ``root`` (``branch``: ``v1.0.0`` or ``main``'s layout)."""
    files = {"llava/eval/eval_multimodal_chat_gpt_score.py": JUDGE_V1 if branch == "v1.0.0" else JUDGE_MAIN}
    if branch == "v1.0.0":
        files.update({"llava/instruct/instruct_generate.py": GENERATE,
                      "llava/instruct/instruct_few_shot_examples.py": FEW_SHOT,
                      "llava/instruct/instruct_postprocess.py": POSTPROCESS})
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
