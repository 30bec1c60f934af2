"""Everything about data: finding samples, transforming images, Arrow shards, statistics,
and the augmentation pipelines that feed the trainer."""
