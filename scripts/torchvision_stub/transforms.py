"""`ToTensor` with torchvision's semantics for what the LeRobot readers pass it: PIL images and HWC arrays."""

import numpy as np
import torch


class ToTensor:
    """PIL image or (H, W[, C]) ndarray -> (C, H, W) tensor; uint8 data becomes float32 scaled to [0, 1]."""

    def __call__(self, pic):
        if isinstance(pic, np.ndarray):
            arr = pic if pic.ndim == 3 else pic[:, :, None]
        else:
            if pic.mode == "1":
                arr = 255 * np.array(pic, dtype=np.uint8, copy=True)
            else:
                dtype = {"I": np.int32, "I;16": np.int16, "F": np.float32}.get(pic.mode, np.uint8)
                arr = np.array(pic, dtype=dtype, copy=True)
            arr = arr.reshape(pic.size[1], pic.size[0], -1)
        img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        if img.dtype == torch.uint8:
            return img.to(torch.float32).div(255)
        return img

    def __repr__(self):
        return f"{self.__class__.__name__}()"
