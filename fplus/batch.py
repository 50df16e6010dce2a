"""Keys of a training/inference batch, shared by the data pipeline, the policy and evaluation.

A batch is a dict; B samples, H action steps, T history latents, K future latents, D latent dim:
    IMAGES        (B, h, w, 3) uint8 or (B, C, h, w, 3) for C cameras
    INSTRUCTIONS  list[str] of B non-empty instructions
    STATE         (B, S) float, raw (optional: only with STATE_KEY)
    ACTIONS       (B, H, A) float, raw (training only)
    ACTION_PAD    (B, H) bool, True past the episode end (training only)
    Z_HIST        (B, T, D) world latents z[t-T+1..t] (with a Prophet)
    Z_FUTURE      (B, K, D) world latents z[t+1..t+K] (training, oracle corruption)
    FUTURE_VALID  (B, K) bool, False past the episode end
    COC_TEXT      list[str] of B chain-of-causation texts (CoC experiments: training and validation)
    PROMPT        PromptBatch: the backbone's tensor inputs, added by the policy's processor (data workers in
                  training; every inference path before the policy) from IMAGES, INSTRUCTIONS [and COC_TEXT]
    COC_PROMPT    PromptBatch with the CoC text of every sample, for validation's L_text (Collate(coc_prompt=True)),
                  beside the plain PROMPT that its actions are predicted from
"""

IMAGES = "images"
INSTRUCTIONS = "instructions"
STATE = "state"
ACTIONS = "actions"
ACTION_PAD = "action_pad"
Z_HIST = "z_hist"
Z_FUTURE = "z_future"
FUTURE_VALID = "future_valid"
COC_TEXT = "coc_text"
PROMPT = "prompt"
COC_PROMPT = "coc_prompt"
