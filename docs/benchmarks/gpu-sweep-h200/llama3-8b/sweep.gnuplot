# Draws sweep.png from sweep.csv (written by llmq-sweep): cd to this folder, then gnuplot sweep.gnuplot
set terminal pngcairo size 1400,1000 font ',11'
set output 'sweep.png'
set datafile separator ','
set datafile columnheaders
set key top left
set grid
set multiplot layout 2,2 title 'llmq-sweep on cuda:NVIDIA H200 (input 128, output 32)'
set logscale x 2
set xlabel 'batch size'
set ylabel 'output tokens/s'
plot 'sweep.csv' using (strcol(1) eq 'none' ? $2 : NaN):5 with linespoints lw 2 title 'none', 'sweep.csv' using (strcol(1) eq 'int8wo' ? $2 : NaN):5 with linespoints lw 2 title 'int8wo', 'sweep.csv' using (strcol(1) eq 'fp8' ? $2 : NaN):5 with linespoints lw 2 title 'fp8'
set logscale x 2
set xlabel 'batch size'
set ylabel 'TPOT (ms)'
plot 'sweep.csv' using (strcol(1) eq 'none' ? $2 : NaN):4 with linespoints lw 2 title 'none', 'sweep.csv' using (strcol(1) eq 'int8wo' ? $2 : NaN):4 with linespoints lw 2 title 'int8wo', 'sweep.csv' using (strcol(1) eq 'fp8' ? $2 : NaN):4 with linespoints lw 2 title 'fp8'
set logscale x 2
set xlabel 'batch size'
set ylabel 'TTFT (ms)'
plot 'sweep.csv' using (strcol(1) eq 'none' ? $2 : NaN):3 with linespoints lw 2 title 'none', 'sweep.csv' using (strcol(1) eq 'int8wo' ? $2 : NaN):3 with linespoints lw 2 title 'int8wo', 'sweep.csv' using (strcol(1) eq 'fp8' ? $2 : NaN):3 with linespoints lw 2 title 'fp8'
unset logscale x
set xlabel 'TPOT (ms): latency per token'
set ylabel 'output tokens/s'
plot 'sweep.csv' using (strcol(1) eq 'none' ? $4 : NaN):5 with linespoints lw 2 title 'none', 'sweep.csv' using (strcol(1) eq 'int8wo' ? $4 : NaN):5 with linespoints lw 2 title 'int8wo', 'sweep.csv' using (strcol(1) eq 'fp8' ? $4 : NaN):5 with linespoints lw 2 title 'fp8'
unset multiplot
