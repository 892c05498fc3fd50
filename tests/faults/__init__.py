"""Black-box fault suite: the reference service as a real process on real servers."""
