"""An accelerate.Accelerator created after devlayer.init() sees the same job."""

import json

import devlayer

with devlayer.init():
    from accelerate import Accelerator

    acc = Accelerator()
    print(
        "RESULT "
        + json.dumps(
            {
                "rank": devlayer.rank(),
                "world": devlayer.world_size(),
                "local": devlayer.local_rank(),
                "device_type": devlayer.device().type,
                "acc_rank": acc.process_index,
                "acc_world": acc.num_processes,
                "acc_local": acc.local_process_index,
                "acc_device_type": acc.device.type,
            }
        ),
        flush=True,
    )
