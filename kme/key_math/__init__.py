"""Key math, a leaf every layer may use: byte histograms and Shannon entropy; the one-time pad and MAC."""
