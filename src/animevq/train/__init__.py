"""Training: the LightningModule (:mod:`.module`) and what it composes, each an object of its
own: the objective (:mod:`.objective`), VQ-GAN's step (:mod:`.gan`), the non-finite guard
(:mod:`.guard`), the optimiser (:mod:`.optim`) and what is logged (:mod:`.monitor`)."""
