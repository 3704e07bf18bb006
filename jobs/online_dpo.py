"""Online DPO on Ray: the main job. The loop is `raydpo/online/loop.py` (read it top-down).

    python jobs/online_dpo.py                       # the embedded demo, on one machine
    python jobs/online_dpo.py --config my.yaml loop.iterations=4
    python jobs/online_dpo.py --resume run_dir=runs/demo   # continue a killed run
    ray job submit --working-dir . -- python jobs/online_dpo.py --config cluster/online_cluster.yaml

With no configuration it builds the synthetic style task (raydpo/tasks/style.py)
and a tiny Llama, SFTs it on mixed-quality demonstrations, deploys the rule
judge on Ray Serve, and runs the online iterations; it joins RAY_ADDRESS (or
cluster.address) if set, else starts a local Ray. --verbose also shows Ray's own logs.
"""

import sys

from raydpo.online.loop import main

if __name__ == "__main__":
    sys.exit(main())
