"""Chain-of-causation labels: validate a CoC JSONL file, generate labels from episode data (templated or by a VLM).

    tokens.py     count tokens with the backbone's tokenizer (or an approximation when it cannot be loaded)
    validate.py   `validate_coc`: every problem of a file, line by line, plus coverage of a dataset
    phases.py     `segment_episode`: approach / grasp / move / release (or approach / contact / settle) phases
    template.py   `compose_text`: a phase-by-phase CoC text that says why each phase follows from the goal
    generate.py   `generate_coc`: one label per episode of a dataset, written atomically as JSONL
    vlm.py        `VlmLabeler`: a Qwen-VL model rewrites the templated phases into a label, from a few frames

The file format itself is read by `fplus.data.coc` (which training uses).
"""
