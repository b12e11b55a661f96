"""Graph helpers shared by passes: opset handling and QDQ node queries."""
