"""A short nnU-Net v2 trainer for edgeseg's test asset (scripts/make_nnunet_asset.py).

nnU-Net finds trainers by scanning nnunetv2/training/nnUNetTrainer/ and imports primus/ (needs
timm) before variants/, so this file is copied to the top level of that folder; prediction looks
the class up the same way. Stock SGD for ~100 iterations leaves Dice at 0: AdamW at lr 3e-3 learns
the hippocampus within 100-200 iterations (8 epochs × 24 here, about 30 s a fold on 2 cores).
"""

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_edgesegShort(nnUNetTrainer):
    # nnU-Net records its constructor's arguments by name (locals()): no *args/**kwargs here.
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 3e-3
        self.num_epochs = 8
        self.num_iterations_per_epoch = 24
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1000

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        # The asset needs weights, not nnU-Net's validation metrics (minutes on 2 cores).
        self.print_to_log_file("edgeseg short trainer: final validation skipped")
