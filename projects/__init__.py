"""Research projects built on detrkit; each has its own modeling code and lazy configs."""
