"""One loader per data set; each returns a :class:`~bridge.data.source.SourceData`."""
