"""Fine-tune a small vision-language model with Dynamic Hybrid Parallelism.

    python examples/vlm_finetune.py                       # 4 CPU processes (gloo), DHP
    python examples/vlm_finetune.py strategy=static_cp strategy.static_degree=4
    python examples/vlm_finetune.py trainer=gpu           # every visible CUDA GPU
    python examples/vlm_finetune.py -m strategy=dhp,static_cp,data_parallel

Configuration lives in lightning_dhp/conf/ (Hydra; shipped with the package, so an installed
``dhp-vlm-finetune`` takes the same overrides); outputs (metrics CSV, TensorBoard, plan plot, summary.json)
land in Hydra's output directory, printed at the end.
"""

from lightning_dhp.app import main

if __name__ == "__main__":
    main()
