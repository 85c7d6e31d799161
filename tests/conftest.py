import os
import sys

# Tests import their support modules (hf_oracle) by name.
sys.path.insert(0, os.path.dirname(__file__))
