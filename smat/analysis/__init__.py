"""Result tables and analysis figures."""
