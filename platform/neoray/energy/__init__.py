"""Energy and carbon of a run: `grid` turns kWh into CO2, `meter` measures a node's energy,
`run` adds the nodes of a training run up, interval by interval."""
